"""Compile every Triton kernel specialisation our launchers request for a GPU architecture — without a GPU.

Why: CPU CI runs the kernels in the Triton interpreter, which checks the arithmetic but not the GPU
compiler: a kernel can pass every interpreter test and still fail to lower (unsupported op/layout), or
ask for more shared memory than the SM has (an "out of resource" at the first launch), or spill its
accumulators to local memory (slow). This tool runs the real launchers (``nsln_triton``,
``attention_triton``, ``sinkhorn_triton``) on CPU tensors with a compile-only Triton driver: every launch, and for
autotuned kernels every configuration the autotuner would benchmark after its own pruning, is compiled
to a cubin for the chosen architecture (default sm_90 = H100/H200) and checked, then nothing runs.

Reported per compiled kernel: shared memory (must fit the architecture's per-block limit), registers per
thread and spilled bytes (from ``cuobjdump --dump-resource-usage``). Exit status 1 when a compile fails
or a kernel does not fit; spills are reported, not fatal (a spilling configuration is one the autotuner
should not pick).

    python benchmarks/triton_aot.py                    # full shape set, sm_90
    python benchmarks/triton_aot.py --quick --arch 90  # the CI subset (tests/test_triton_aot.py)
    python benchmarks/triton_aot.py --md benchmarks/results/triton_aot-sm90-DATE.md

Must run with ``TRITON_INTERPRET`` unset (the kernels have to be real JIT functions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_aot: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Max dynamic shared memory per block (opt-in), bytes, from the CUDA programming guide's
# compute-capability table: sm_80 163 KB, sm_86/89 99 KB, sm_90/100 227 KB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


@dataclass
class Compiled:
    case: str
    kernel: str
    constexprs: str
    num_warps: int
    num_stages: int
    shared: int = 0
    regs: int = -1
    spill_bytes: int = -1
    seconds: float = 0.0
    error: str = ""
    fits: bool = True
    launch: int = 0  # one launch site call; an autotuned launch compiles all its candidates under one id


@dataclass
class _State:
    arch: int
    case: str = ""
    launch: int = 0
    in_tuner: bool = False
    seen: set = field(default_factory=set)
    results: List[Compiled] = field(default_factory=list)


class _CompileOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.run(..., warmup=True)``: a fixed target, no device."""

    def __init__(self, target: GPUTarget):
        self._target = target

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"triton_aot: the compile-only driver has no '{name}' (something tried to launch)")


def _cuobjdump() -> Optional[str]:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the one function in a cubin.

    Triton kernels have no local arrays or recursion, so a non-zero stack frame is register spill."""
    tool = _cuobjdump()
    if tool is None:
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    loc = re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else -1), (int(loc.group(1)) if loc else -1)


def _short(v) -> str:
    return {True: "1", False: "0"}.get(v, str(v)) if isinstance(v, bool) else str(v)


def install(state: _State):
    """Patch Triton so that launches compile for ``state.arch`` and record, and never run."""
    _driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", state.arch, 32)))
    jit_run = JITFunction.run

    def run(self, *args, grid, warmup=False, **kwargs):
        if not state.in_tuner:
            state.launch += 1
        const = {p.name: (kwargs[p.name] if p.name in kwargs else args[i] if i < len(args) else None)
                 for i, p in enumerate(self.params) if p.is_constexpr}
        tensors = tuple(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
        desc = ",".join(f"{k}={_short(v)}" for k, v in const.items())
        warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
        key = (self.__name__, desc, tensors, warps, stages)
        if key in state.seen:
            return None
        state.seen.add(key)
        rec = Compiled(state.case, self.__name__, desc + (f" [{tensors[0]}]" if tensors else ""), warps, stages,
                       launch=state.launch)
        t0 = time.perf_counter()
        try:
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
            rec.shared = int(kernel.metadata.shared)
            rec.regs, rec.spill_bytes = _resources(kernel.asm["cubin"])
            rec.fits = rec.shared <= SMEM_LIMIT.get(state.arch, 232448)
        except Exception as exc:  # noqa: BLE001 — every failure is a finding to report
            rec.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            rec.fits = False
        rec.seconds = time.perf_counter() - t0
        state.results.append(rec)
        return None

    def tuned_run(self, *args, **kwargs):
        # Every configuration the autotuner would time after its own pruning gets compiled.
        self.nargs = dict(zip(self.arg_names, args))
        state.launch += 1
        state.in_tuner = True
        try:
            for config in self.prune_configs(kwargs):
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            state.in_tuner = False
            self.nargs = None

    JITFunction.run = run
    Autotuner.run = tuned_run


# ------------------------------------------------------------------------------------------------ cases
def _nsln_cases(quick: bool) -> Dict[str, Callable[[], None]]:
    from lct_fast.ops import nsln_triton as K

    shapes = ([(1152, torch.bfloat16), (8192, torch.bfloat16), (131072, torch.bfloat16), (1000, torch.float32)]
              if quick else [(n, dt) for dt in (torch.bfloat16, torch.float16, torch.float32)
                             for n in (384, 768, 1000, 1024, 1152, 1536, 4096, 8192, 131072, 1 << 20)])
    cases = {}
    for n, dt in shapes:
        def case(n=n, dt=dt):
            b, t = 2, 3
            x = torch.zeros(b * t, n, dtype=dt)
            bias, sh, sc = torch.zeros(n, dtype=dt), torch.zeros(b, n, dtype=dt), torch.zeros(b, n, dtype=dt)
            _, mean, rstd = K.forward(x, bias, None, None, 1e-6)                      # NsLN
            K.forward(x, bias, sh, sc, 1e-6)                                           # adaLN-modulated
            K.jvp(x, x, bias, bias, sh, sc, sh, sc, 1e-6)                              # all tangents
            K.jvp(x, x, None, None, sh, sc, None, None, 1e-6, with_primal=False)      # x tangent only
            K.backward(x, x, mean, rstd, sc, need_dbias=True, need_dshift=True, need_dscale=True)
            K.backward(x, x, mean, rstd, None, num_samples=b, need_dbias=True)
        cases[f"nsln N={n} {str(dt)[6:]}"] = case
    return cases


def _attention_cases(quick: bool) -> Dict[str, Callable[[], None]]:
    from lct_fast.ops import attention_triton as K

    # L = 1000 compiles the masked-tail (EVEN_N = 0) variants
    shapes = ([(64, 1000, torch.bfloat16), (128, 1024, torch.bfloat16), (64, 1024, torch.float32)] if quick
              else [(d, n, dt) for dt in (torch.bfloat16, torch.float16, torch.float32) for d in (32, 64, 72, 128, 256)
                    for n in (1000, 1024)])
    cases = {}
    for d, n, dt in shapes:
        def case(d=d, n=n, dt=dt):
            q = torch.zeros(1, 2, n, d, dtype=dt)
            o, lse = K.attn_fwd(q, q, q, d ** -0.5)
            K.attn_fwd(q, q, q, d ** -0.5, q, q, q, tangent=True)
            K.attn_fwd(q, q, q, d ** -0.5, q, None, None, tangent=True)
            K.attn_bwd(q, q, q, q, o, lse, d ** -0.5)
        cases[f"attention Dh={d} L={n} {str(dt)[6:]}"] = case
    return cases


def _ot_cases(quick: bool) -> Dict[str, Callable[[], None]]:
    from lct_fast.ops import sinkhorn_triton as K

    K._check_square = lambda C, who: None  # the launchers insist on CUDA tensors; here nothing runs
    sizes = [256] if quick else [64, 128, 256, 512, 1000, 1024, 2048]
    return {f"ot n={n}": (lambda n=n: K.sinkhorn_assignment_triton(torch.zeros(2, n, n))) for n in sizes}


def run(arch: int, quick: bool, only: Optional[str] = None) -> List[Compiled]:
    state = _State(arch)
    install(state)
    cases = {**_nsln_cases(quick), **_attention_cases(quick), **_ot_cases(quick)}
    for name, fn in cases.items():
        if only and not any(part.strip() in name for part in only.split(",")):
            continue
        state.case = name
        t0 = time.perf_counter()
        n0 = len(state.results)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 — a launcher failing on CPU tensors is a finding too
            state.results.append(Compiled(name, "<launcher>", "", 0, 0, error=f"{type(exc).__name__}: {exc}"[:300],
                                          fits=False))
        print(f"  {name}: {len(state.results) - n0} kernels in {time.perf_counter() - t0:.1f}s", flush=True)
    return state.results


def _split(constexprs: str) -> tuple[str, str]:
    """(tile sizes BLOCK_M/BLOCK_N, the other constexprs) of a record's constexpr string."""
    parts = constexprs.split(" [")[0].split(",")
    tiles = [p for p in parts if p.startswith(("BLOCK_M=", "BLOCK_N="))]
    return ",".join(p.split("=")[1] for p in tiles), ",".join(p for p in parts if p not in tiles)


def to_markdown(results: List[Compiled], arch: int) -> str:
    """A summary per launch (kernel + flags): candidates, how many spill, worst spill, resource ranges."""
    bad = [r for r in results if r.error or not r.fits]
    spill = [r for r in results if r.spill_bytes > 0]
    groups: Dict[tuple, List[Compiled]] = {}
    for r in results:
        groups.setdefault((r.case, r.launch), []).append(r)
    lines = [f"# Triton AOT compile check, sm_{arch}",
             "",
             f"triton {triton.__version__}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; compiled on a "
             f"CPU-only machine with `benchmarks/triton_aot.py` (no kernel ran). {len(results)} kernel "
             f"specialisations (autotune candidates included), {len(bad)} failing, {len(spill)} spilling; "
             f"shared-memory limit {SMEM_LIMIT.get(arch, 232448)} B. One row per launch: its candidates after "
             "pruning, how many spill registers, and the best (least-spilling) candidate.",
             "",
             "| case | kernel | flags | candidates | spilling | best: tiles, warps | best spill B | regs | smem B (max) | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (case, _), rs in groups.items():
        best = min(rs, key=lambda r: (r.spill_bytes, -r.num_warps))
        tiles, flags = _split(best.constexprs)
        kernel = best.kernel
        ok = "yes" if not any(r.error or not r.fits for r in rs) else "FAIL: " + next(
            (r.error for r in rs if r.error), "shared memory")
        lines.append(f"| {case} | {kernel} | {flags} | {len(rs)} | {sum(r.spill_bytes > 0 for r in rs)} | "
                     f"{tiles or '-'}, {best.num_warps} | {best.spill_bytes} | {min(r.regs for r in rs)}–"
                     f"{max(r.regs for r in rs)} | {max(r.shared for r in rs)} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="the CI subset: bf16, a few shapes")
    ap.add_argument("--only", default=None,
                    help="run only cases whose name contains one of these comma-separated strings")
    ap.add_argument("--md", default=None, help="write the table to this Markdown file")
    ap.add_argument("--json", default=None, help="write the records to this JSON file")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = run(args.arch, args.quick, args.only)
    bad = [r for r in results if r.error or not r.fits]
    spill = [r for r in results if r.spill_bytes > 0]
    print(f"{len(results)} kernels compiled for sm_{args.arch} in {time.perf_counter() - t0:.0f}s; "
          f"{len(bad)} failing, {len(spill)} spilling")
    for r in bad:
        print(f"FAIL {r.case} {r.kernel} {r.constexprs} w={r.num_warps} s={r.num_stages} smem={r.shared}: {r.error}")
    for r in spill:
        print(f"spill {r.case} {r.kernel} {r.constexprs} w={r.num_warps} s={r.num_stages}: {r.spill_bytes} B, "
              f"{r.regs} regs")
    if args.md:
        with open(args.md, "w") as f:
            f.write(to_markdown(results, args.arch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
