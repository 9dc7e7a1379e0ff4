"""Benchmark of the minibatch OT coupling: time and quality of each solver, side by side.

    PYTHONPATH=. python benchmarks/bench_ot.py                      # GPU: the full grid, results saved
    PYTHONPATH=. python benchmarks/bench_ot.py --quick              # CPU sanity mode (tiny sizes, not saved)
    PYTHONPATH=. python benchmarks/bench_ot.py --step-ms 310        # also print overhead vs a training step
    PYTHONPATH=. python benchmarks/bench_ot.py --step-config configs/b.json   # measure that step here

Providers (each returns a permutation; time is end to end from device tensors x0, z to the permutation on the
device, synchronised, median over repeats after a warm-up):

``pot_emd``           POT ``ot.emd`` (network simplex) on the CPU in fp64, including the device→host copy
                      and the cost matrix (what the paper's code does every step) = ``couple(method="exact")``.
``scipy_lsa``         scipy ``linear_sum_assignment`` on the CPU, same copy = ``couple(method="hungarian")``.
``pot_sinkhorn``      POT ``ot.sinkhorn(method="sinkhorn_log")`` on device tensors (torch backend), same
                      reduced/scaled cost, ε and iteration budget as ours, rounded by our greedy rounding.
``ours_reference``    ``couple(method="sinkhorn", backend="reference")`` (PyTorch, host check every 4 rounds).
``ours_triton``       ``couple(method="sinkhorn", backend="triton")`` (GPU only).
``ours_cuda``         ``couple(method="sinkhorn", backend="cuda")`` (GPU with the csrc/ extension built).

``ratio_to_exact`` is the mean pair cost over the exact optimum on the same batch (1.0 = optimal).
Data: 'spiky' latents (Gaussian body plus 1 % large spikes, like SD-VAE latents, SPEC §1) and N(0, I) noise.

A second table (``--global``) measures whether coupling across ranks pays: for W simulated ranks of B samples
each, the mean pair cost relative to the identity pairing with per-rank coupling (W problems of size B)
vs one global problem of size W·B, and the time of the global solve (the all-gather of W·B·2·D values is not
included: on NVLink it is ~W·B·2·D·4 bytes / ~300 GB/s).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.harness import machine_string, write_results  # noqa: E402
from lct_fast import ot as O  # noqa: E402


def make_batch(n: int, d: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device)
    spikes = torch.rand(n, d, generator=g, device=device) < 0.01
    x = torch.where(spikes, 8.0 * torch.randn(n, d, generator=g, device=device), x)
    return x, torch.randn(n, d, generator=g, device=device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], torch.Tensor], device: str, repeats: int) -> tuple[float, torch.Tensor]:
    """(median ms, last result); one warm-up call; fewer repeats for slow providers."""
    out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if sum(times) > 3000:  # slow CPU solvers: a few seconds of samples is plenty
            break
    return statistics.median(times), out


def pot_sinkhorn(x: torch.Tensor, z: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    import ot as pot

    C = O.reduce_and_scale(O._batched_cost(x.unsqueeze(0).float(), z.unsqueeze(0).float()))[0]
    n = C.shape[0]
    w = torch.full((n,), 1.0 / n, device=C.device)
    with warnings.catch_warnings():  # POT warns when the fixed budget ends before its own tolerance
        warnings.simplefilter("ignore", UserWarning)
        plan = pot.sinkhorn(w, w, C, eps, method="sinkhorn_log", numItermax=iters, stopThr=1e-9)
    return O.round_to_permutation((-plan).unsqueeze(0))[0]


def providers(device: str, eps: float, iters: int) -> dict[str, Callable]:
    out = {
        "pot_emd": lambda x, z: O.couple(x, z, "exact"),
        "scipy_lsa": lambda x, z: O.couple(x, z, "hungarian"),
        "pot_sinkhorn": lambda x, z: pot_sinkhorn(x, z, eps, iters),
        "ours_reference": lambda x, z: O.couple(x, z, "sinkhorn", backend="reference", eps=eps, iters=iters),
    }
    if device == "cuda":
        out["ours_triton"] = lambda x, z: O.couple(x, z, "sinkhorn", backend="triton", eps=eps, iters=iters)
        from lct_fast.ops.sinkhorn_cuda import cuda_ops_loaded

        if cuda_ops_loaded()[0]:  # the csrc/ extension is built (pip install --no-build-isolation -e .)
            out["ours_cuda"] = lambda x, z: O.couple(x, z, "sinkhorn", backend="cuda", eps=eps, iters=iters)
    return out


def bench_grid(ns, ds, device, repeats, eps, iters, skip_exact_above) -> list[dict]:
    rows = []
    for d in ds:
        for n in ns:
            x, z = make_batch(n, d, device, seed=n + d)
            ident = float(O.transport_cost(x, z))
            exact_cost = float(O.transport_cost(x, z, O.couple(x, z, "hungarian")))
            base_ms = None
            for name, fn in providers(device, eps, iters).items():
                if name in ("pot_emd", "scipy_lsa", "ours_reference") and n > skip_exact_above:
                    continue
                try:
                    ms, perm = timed(lambda: fn(x, z), device, repeats)
                except Exception as e:  # a provider that fails is reported, not fatal
                    print(f"  {name} n={n} D={d}: failed: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                cost = float(O.transport_cost(x, z, perm))
                base_ms = ms if name == "pot_emd" else base_ms
                row = {"n": n, "D": d, "provider": name, "ms": round(ms, 4),
                       "ratio_to_exact": round(cost / exact_cost, 6), "ratio_to_identity": round(cost / ident, 5),
                       "speedup_vs_pot_emd": round(base_ms / ms, 2) if base_ms else ""}
                rows.append(row)
                print(f"n={n:5d} D={d:6d} {name:15s} {ms:10.3f} ms  cost/exact {cost / exact_cost:.5f}  "
                      f"cost/identity {cost / ident:.4f}  x{row['speedup_vs_pot_emd']}", flush=True)
    return rows


def bench_global(per_rank, worlds, d, device, eps, iters) -> list[dict]:
    rows = []
    for b in per_rank:
        for w in worlds:
            x, z = make_batch(w * b, d, device, seed=7 * b + w)
            ident = float(O.transport_cost(x, z))
            solver = "hungarian" if w * b <= 1024 else "sinkhorn"
            local = O.couple(x, z, solver, groups=w, eps=eps, iters=iters)
            backend = "triton" if device == "cuda" else "reference"
            ms, glob = timed(lambda: O.couple(x, z, "sinkhorn", backend=backend, eps=eps, iters=iters), device, 5)
            exact_glob = O.couple(x, z, solver, eps=eps, iters=iters)
            row = {"per_rank_B": b, "world": w, "D": d,
                   "per_rank_cost/identity": round(float(O.transport_cost(x, z, local)) / ident, 5),
                   "global_cost/identity": round(float(O.transport_cost(x, z, exact_glob)) / ident, 5),
                   "global_ours_cost/identity": round(float(O.transport_cost(x, z, glob)) / ident, 5),
                   "global_solve_ms": round(ms, 4)}
            rows.append(row)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def bench_overhead(config_path: str, device: str, repeats: int, eps: float, iters: int) -> list[dict]:
    """Coupling time against one step of the preset, measured by the profile tool on the trainer's own step
    (``lct_fast.profiler.measure_step_ms``: DeepSpeed engine, loss incl. the JVP pass, backward, optimizer,
    EMA; the embedded data shaped like the model), at the preset's micro-batch."""
    from lct_fast.profiler import measure_step_ms

    step_ms, n, d, _ = measure_step_ms(config_path)
    x, z = make_batch(n, d, device, seed=n + d)
    rows = []
    for name, fn in providers(device, eps, iters).items():
        if not name.startswith("ours") and name != "pot_emd":
            continue
        try:
            ms, _ = timed(lambda: fn(x, z), device, repeats)
        except Exception as e:  # noqa: BLE001 — reported, not fatal
            print(f"  {name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        rows.append({"config": os.path.basename(config_path), "micro_batch": n, "D": d, "step_ms": round(step_ms, 3),
                     "provider": name, "coupling_ms": round(ms, 4), "overhead_pct": round(100 * ms / step_ms, 3)})
        print(f"{os.path.basename(config_path)}: step {step_ms:.2f} ms at micro-batch {n}; {name} coupling "
              f"{ms:.3f} ms = {100 * ms / step_ms:.2f} % of the step", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--d", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--skip-exact-above", type=int, default=4096, help="skip CPU solvers above this n")
    ap.add_argument("--global", dest="do_global", action="store_true", help="also the global-batch table")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="time of one training step (e.g. the b preset) to report the coupling overhead in %%")
    ap.add_argument("--micro-batch", type=int, default=256, help="per-rank batch for the overhead figure")
    ap.add_argument("--step-config", default=None,
                    help="measure one training step of this preset here and the coupling overhead against it")
    ap.add_argument("--quick", action="store_true", help="tiny CPU sanity run (no GPU needed)")
    ap.add_argument("--save", action="store_true", help="write results via the harness (default on GPU)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"bench_ot on {machine_string()}")
    if device == "cpu" and not args.quick:
        print("bench_ot: no CUDA device; the Triton kernels need a GPU. Run with --quick for a CPU sanity "
              "check of the CPU solvers and the PyTorch reference path; GPU numbers come from a GPU session.")
        return
    if args.quick:
        args.n, args.d, args.repeats = [64, 128], [256], 3
    rows = bench_grid(args.n, args.d, device, args.repeats, args.eps, args.iters, args.skip_exact_above)
    grows = []
    if args.do_global or args.quick:
        per_rank = [16, 32] if args.quick else [32, 64, 128, 256]
        worlds = [1, 2, 4] if args.quick else [1, 2, 4, 8]
        grows = bench_global(per_rank, worlds, 256 if args.quick else 4096, device, args.eps, args.iters)
    if args.step_ms > 0:
        ours = [r for r in rows if r["n"] == args.micro_batch and r["provider"] in ("ours_triton", "ours_reference")]
        for r in ours:
            print(f"overhead of {r['provider']} at n={r['n']} D={r['D']}: {100 * r['ms'] / args.step_ms:.2f} % "
                  f"of a {args.step_ms} ms step")
    save = device == "cuda" or args.save
    if save:
        notes = (f"ε={args.eps} (relative to the mean reduced cost), {args.iters} Sinkhorn iterations, 8 2-opt "
                 "rounds; 'spiky' latents vs N(0, I) noise; ms = median end to end incl. copies, synchronised.")
        paths = write_results("bench_ot", rows, notes=notes)
        if grows:
            paths += write_results("bench_ot_global", grows, notes="per-rank vs global-batch coupling quality")
        print("results:", *paths)
    if args.step_config:
        # last, and guarded: the first full training step on a device must not cost the tables above
        try:
            orows = bench_overhead(args.step_config, device, args.repeats, args.eps, args.iters)
        except Exception as e:  # noqa: BLE001
            print(f"bench_ot: step measurement for {args.step_config} failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
            orows = []
        if orows and save:
            print("results:", *write_results(
                "bench_ot_overhead", orows,
                notes="one optimizer step of the preset (the trainer's step through lct_fast.profiler: DeepSpeed "
                      "engine, loss incl. JVP pass, backward, optimizer, EMA; 1 device) vs one coupling at its "
                      "micro-batch"))


if __name__ == "__main__":
    main()
