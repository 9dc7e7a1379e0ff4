#!/usr/bin/env python
"""Attention kernels side by side: forward, JVP (forward + tangent) and forward+backward.

Providers
  forward   ours (Triton flash, ``lct_fast::flash_attn_fwd``) · SDPA flash
  jvp       ours (fused one-pass kernel) · ours through forward-AD dual tensors (the sCT path) ·
            ``torch.func.jvp`` of the math SDPA · ``torch.func.jvp`` of the explicit softmax reference ·
            ``jvp_flash_attention`` (if installed)
  fwd+bwd   ours (Triton FA2 backward) · SDPA flash
on [B, H, L, Dh] bf16 with B·L tokens fixed, L = 256 / 1024 / 4096, Dh = 64 / 128.

FLOPs: ``lct_fast.profiler.flops.attention_flops`` (one definition for this benchmark, ``launch/profile.py`` and
SPEC §5): forward = 4·B·H·L²·Dh; the JVP pass = primal + tangent = 3× that; forward+backward 3.5× (backward
2.5×, as FlashAttention-2 counts it). Peak memory is the allocation high-water mark above the inputs.
Targets (H100/H200): JVP ≥ 4× faster than math-SDPA JVP at L = 1024 with O(L) memory, ≥ 450 TFLOP/s
at L = 4096 / Dh = 128, forward within 25 % of SDPA flash.

    python benchmarks/bench_attention.py                 # full sweep, results to benchmarks/results/
    python benchmarks/bench_attention.py --seqlens 1024 --dims 64 --no-write

Without a CUDA device it prints a message and exits 0 (the kernels are tested on CPU under the Triton
interpreter in tests/test_flash_attention.py; timings there would be meaningless).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import machine_string, write_results  # noqa: E402
from lct_fast.profiler.flops import attention_flops, peak_tflops  # noqa: E402


def _measure(fn: Callable[[], object], warmup: int, rep: int) -> Dict[str, float]:
    """Median ms (triton.testing.do_bench) and peak extra memory (MiB) of one call."""
    import triton.testing

    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return {"ms": ms, "peak_mib": peak}


def _providers(q, k, v, tq, tk, tv, go):
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import lct_fast.ops.attention_fused as fa
    from lct_fast.ops import attention_reference

    def sdpa(backend):
        def f(a, b, c):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(a, b, c)
        return f

    def ours_fwad():
        with torch.no_grad(), fwAD.dual_level():
            out = fa.flash_attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
            return fwAD.unpack_dual(out).tangent

    def func_jvp(f):
        return lambda: torch.func.jvp(f, (q, k, v), (tq, tk, tv))

    qg, kg, vg = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def fwd_bwd(f):
        def run():
            qg.grad = kg.grad = vg.grad = None
            f(qg, kg, vg).backward(go)
        return run

    provs = {
        "forward": {
            "ours": lambda: fa.flash_attn_fwd(q, k, v, q.shape[-1] ** -0.5),
            "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v),
        },
        "jvp": {
            "ours": lambda: fa.flash_attention_jvp(q, k, v, tq, tk, tv),
            "ours_forward_ad": ours_fwad,
            "func_jvp_math_sdpa": func_jvp(sdpa(SDPBackend.MATH)),
            "func_jvp_explicit": func_jvp(attention_reference),
        },
        "fwd+bwd": {
            "ours": fwd_bwd(fa.flash_attention),
            "sdpa_flash": fwd_bwd(sdpa(SDPBackend.FLASH_ATTENTION)),
        },
    }
    try:  # the best public Triton JVP kernel, for comparison (optional dependency)
        from jvp_flash_attention.jvp_attention import attention as jvp_attention

        provs["jvp"]["jvp_flash_attention"] = func_jvp(jvp_attention)
    except Exception as exc:  # noqa: BLE001 - any import problem just drops the provider
        print(f"[bench_attention] jvp_flash_attention unavailable ({type(exc).__name__}); skipping it")
    return provs


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16384, help="B·L per call (B = tokens // L, at least 1)")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results/")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device - GPU benchmark skipped (CPU correctness: "
              "pytest tests/test_flash_attention.py under TRITON_INTERPRET=1).")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_attention: triton is not installed - nothing to benchmark.")
        return 0

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    gpu = torch.cuda.get_device_name(0)
    peak = peak_tflops(gpu, "bf16")  # the fp16 tensor-core peak equals the bf16 one
    print(f"Machine: {machine_string()}")
    rows = []
    for L in args.seqlens:
        for D in args.dims:
            B = max(1, args.tokens // L)
            H = args.heads
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, tq, tk, tv, go = [torch.randn(B, H, L, D, generator=g, device="cuda", dtype=dtype)
                                       for _ in range(7)]
            for mode, provs in _providers(q, k, v, tq, tk, tv, go).items():
                for name, fn in provs.items():
                    row = {"mode": mode, "provider": name, "B": B, "H": H, "L": L, "Dh": D, "dtype": args.dtype}
                    try:
                        m = _measure(fn, args.warmup, args.rep)
                        tf = attention_flops(B, H, L, L, D, mode) / (m["ms"] * 1e-3) / 1e12
                        row.update(ms=round(m["ms"], 4), tflops=round(tf, 1), peak_mib=round(m["peak_mib"], 1))
                        if peak:
                            row["pct_peak"] = round(100 * tf / peak, 1)
                    except torch.cuda.OutOfMemoryError:
                        row.update(ms="OOM", tflops="", peak_mib="")
                    except Exception as exc:  # noqa: BLE001 - report and continue with other providers
                        row.update(ms=f"error: {type(exc).__name__}: {str(exc)[:80]}", tflops="", peak_mib="")
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(f"{mode:8s} {name:22s} B={B:3d} H={H} L={L:5d} Dh={D:3d}  ms={row['ms']!s:>9}  "
                          f"TFLOP/s={row['tflops']!s:>6}  peak={row['peak_mib']!s:>8} MiB")
            del q, k, v, tq, tk, tv, go
            torch.cuda.empty_cache()

    # target summary
    def get(mode, prov, L, D):
        for r in rows:
            if (r["mode"], r["provider"], r["L"], r["Dh"]) == (mode, prov, L, D) and isinstance(r["ms"], float):
                return r
        return None

    print("\nTargets:")
    for D in args.dims:
        ours, math_ = get("jvp", "ours", 1024, D), get("jvp", "func_jvp_math_sdpa", 1024, D)
        if ours and math_:
            print(f"  JVP speed-up vs math-SDPA JVP at L=1024, Dh={D}: {math_['ms'] / ours['ms']:.2f}x (target >= 4x)")
        for L in args.seqlens:
            f_o, f_s = get("forward", "ours", L, D), get("forward", "sdpa_flash", L, D)
            if f_o and f_s:
                print(f"  forward L={L} Dh={D}: ours/SDPA-flash time = {f_o['ms'] / f_s['ms']:.2f} (target <= 1.25)")
    r = get("jvp", "ours", 4096, 128)
    if r:
        print(f"  JVP TFLOP/s at L=4096, Dh=128: {r['tflops']} (target >= 450)")
    if not args.no_write:
        csv_path, md_path = write_results(
            "bench_attention", rows,
            notes=(f"{args.dtype}, B·L = {args.tokens} tokens, H = {args.heads}. FLOPs: forward 4·B·H·L²·Dh, "
                   "JVP 3x, fwd+bwd 3.5x. peak_mib: allocation high-water mark above the inputs."))
        print(f"results: {csv_path}\n         {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
