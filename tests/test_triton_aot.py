"""Every Triton kernel compiles for sm_90 (H100/H200) on this GPU-less machine.

The interpreter tests check the kernels' arithmetic; these check what only the GPU compiler sees. The launchers
run through ``benchmarks/triton_aot.py`` with a compile-only driver, which compiles every specialisation they
request — and for autotuned kernels every candidate configuration left after our pruning — to an sm_90 cubin:

* every compile succeeds and fits in the SM's shared memory (otherwise: "out of resource" at first launch);
* every kernel defined in the three kernel modules is exercised (a new kernel cannot escape the check);
* every autotuned launch has at least one candidate that does not spill registers;
* the pruning's register-pressure model holds: no surviving candidate spills more than a few hundred bytes.
"""
import ast
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["lct_fast/ops/nsln_triton.py", "lct_fast/ops/attention_triton.py", "lct_fast/ops/sinkhorn_triton.py"]


def _kernels(path):
    """Names of the @triton.jit functions named *_kernel in a source file."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
            if any("jit" in ast.unparse(d) for d in node.decorator_list):
                out.add(node.name)
    return out


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default
    res = subprocess.run([sys.executable, "benchmarks/triton_aot.py", "--quick", "--arch", "90", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), f"triton_aot produced nothing (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    recs = json.loads(out.read_text())
    assert recs, res.stdout[-3000:]
    return recs


def test_every_specialisation_compiles_and_fits(records):
    bad = [r for r in records if r["error"] or not r["fits"]]
    assert not bad, "\n".join(f"{r['case']} {r['kernel']} {r['constexprs']} w={r['num_warps']} s={r['num_stages']} "
                              f"smem={r['shared']}: {r['error'] or 'shared memory over the sm_90 limit'}" for r in bad)
    # the resource report was read (cuobjdump ships with Triton)
    assert all(r["regs"] > 0 and r["spill_bytes"] >= 0 for r in records)


def test_every_kernel_is_exercised(records):
    compiled = {r["kernel"] for r in records}
    for path in MODULES:
        defined = _kernels(path)
        assert defined, path
        assert defined <= compiled, f"{path}: not compiled by benchmarks/triton_aot.py: {sorted(defined - compiled)}"


def test_autotuned_launches_have_a_spill_free_candidate(records):
    by_launch = {}
    for r in records:
        by_launch.setdefault((r["case"], r["launch"]), []).append(r)
    tuned = {k: v for k, v in by_launch.items() if len(v) > 1}
    assert tuned, "no autotuned launch was compiled"
    for (case, _), recs in tuned.items():
        assert min(r["spill_bytes"] for r in recs) == 0, \
            f"{case} {recs[0]['kernel']}: every candidate spills: " + \
            ", ".join(f"w={r['num_warps']} {r['constexprs'].split(',')[:2]}: {r['spill_bytes']} B" for r in recs)


def test_pruning_keeps_spills_small(records):
    # attention_triton.live_per_thread / nsln_triton.MAX_PER_THREAD prune what spills ≥ ~400 B per thread (the
    # calibration in their comments); a candidate past that means the model no longer matches the compiler.
    worst = max(records, key=lambda r: r["spill_bytes"])
    assert worst["spill_bytes"] <= 256, worst


def test_register_model_orders_flash_configs():
    # Independent of the compiler: the model must reject the tile shapes measured to spill heavily on sm_90.
    from lct_fast.ops.attention_triton import MAX_LIVE_PER_THREAD, live_per_thread

    assert live_per_thread("jvp", 128, 64, 128, 4) > MAX_LIVE_PER_THREAD  # 1.7 KB/thread spill measured
    assert live_per_thread("fwd", 128, 128, 128, 4) > MAX_LIVE_PER_THREAD  # 632 B
    assert live_per_thread("jvp", 64, 32, 128, 8) <= MAX_LIVE_PER_THREAD  # 0 B
    assert live_per_thread("fwd", 128, 64, 64, 8) <= MAX_LIVE_PER_THREAD  # 0 B


def test_pruning_rules_and_the_autotune_switch(monkeypatch):
    import torch
    import triton

    from lct_fast.ops import attention_triton as FK
    from lct_fast.ops import nsln_triton as NT
    from lct_fast.ops.dispatch import with_autotune_switch as switched

    cfgs = FK._configs(FK._MMA_TILES["jvp"], stages=(2, 3))
    q16 = torch.zeros(1, 1, 16, 128, dtype=torch.bfloat16)
    kept = FK._prune("jvp")(cfgs, {"Q": q16}, BLOCK_D=128)
    assert 0 < len(kept) < len(cfgs)
    assert all(FK.live_per_thread("jvp", c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 128, c.num_warps)
               <= FK.MAX_LIVE_PER_THREAD for c in kept)
    # fp32 operands take twice the shared memory per tile: a subset of the bf16 candidates survives
    kept32 = FK._prune("jvp")(cfgs, {"Q": q16.float()}, BLOCK_D=128)
    assert {id(c) for c in kept32} < {id(c) for c in kept}
    warps = [triton.Config({}, num_warps=w) for w in NT._WARPS]
    assert [c.num_warps for c in NT._prune_warps("fwd")(warps, {}, BLOCK_N=8192)] == [8, 16]
    assert [c.num_warps for c in NT._prune_warps("bwd")(warps, {}, BLOCK_N=8192)] == [16]
    assert [c.num_warps for c in NT._prune_warps("fwd")(warps, {}, BLOCK_N=64)] == [1, 2]
    monkeypatch.setenv("LCT_FAST_AUTOTUNE", "0")  # correctness runs: the first surviving candidate only
    assert switched(FK._prune("jvp"))(cfgs, {"Q": q16}, BLOCK_D=128) == kept[:1]
    assert [c.num_warps for c in switched(NT._prune_warps("fwd"))(warps, {}, BLOCK_N=8192)] == [8]
