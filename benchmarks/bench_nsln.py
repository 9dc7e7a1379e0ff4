"""Fused NsLN benchmark: providers side by side on DiT and UNet shapes.

Providers: torch eager (F.layer_norm + modulate), torch.compile of the same, apex FusedLayerNorm (+ eager
modulate; only when apex is installed), Triton, CUDA (when lct_fast._C is built). Modes: fwd, bwd (backward
alone, timed as fwd+bwd − fwd), fwd+bwd, jvp (primal + tangent of x, shift, scale under forward_ad).
Prints ms, GB/s (compulsory bytes: read inputs once, write outputs once) and % of the GPU's peak memory
bandwidth, and writes the table to benchmarks/results/ through benchmarks/harness.py.

    python benchmarks/bench_nsln.py                 # all shapes, bf16
    python benchmarks/bench_nsln.py --quick         # a few shapes
    python benchmarks/bench_nsln.py --dtype fp32 --providers triton,cuda,compile

Without a CUDA device it prints a message and exits 0 (``--cpu-sanity`` runs a tiny interpreter check).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Peak HBM bandwidth (GB/s) by device name fragment (vendor spec sheets).
PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
            "A100": 1555.0, "L40S": 864.0, "L4": 300.0}

# (name, B, T, N, modulate): DiT presets at 256² latents 32×32, patch 2 → 256 tokens; UNet's whole C·H·W
SHAPES = [
    ("DiT-S b256", 256, 256, 384, True),
    ("DiT-B b256", 256, 256, 768, True),
    ("DiT-L b128", 128, 256, 1024, True),
    ("DiT-XL b64", 64, 256, 1152, True),
    ("DiT-XXL b32", 32, 256, 1536, True),
    ("DiT-XL b32 1024tok", 32, 1024, 1152, True),
    ("UNet 128x32x32 b64", 64, 1, 128 * 32 * 32, False),
    ("UNet 256x16x16 b64", 64, 1, 256 * 16 * 16, False),
    ("UNet 512x8x8 b256", 256, 1, 512 * 8 * 8, False),
]
QUICK = [0, 3, 4, 6]


def peak_gbs(name: str) -> Optional[float]:
    for k, v in PEAK_GBS.items():
        if k in name:
            return v
    return None


def _eager(x, shift, scale, bias, eps=1e-6):
    y = F.layer_norm(x, (x.shape[-1],), None, None, eps)
    if scale is not None:
        y = y * (1 + scale[:, None]) + shift[:, None]
    return y + bias if bias is not None else y


def _eager_jvp_mod(x, shift, scale, bias, xd, shiftd, scaled):
    return torch.func.jvp(_eager, (x, shift, scale, bias), (xd, shiftd, scaled, torch.zeros_like(bias)))


def _eager_jvp_plain(x, bias, xd):
    return torch.func.jvp(lambda x_: _eager(x_, None, None, bias), (x,), (xd,))


# torch.compile does not carry forward-AD dual tensors: a compiled function called on make_dual inputs
# returns no tangent at all (checked on torch 2.13), so timing it would time a plain forward. The compile
# provider's JVP is torch.compile of torch.func.jvp instead (one graph, tangent checked against eager).
_COMPILED_JVP: Dict[bool, Callable] = {}


def _compiled_jvp(mod: bool) -> Callable:
    if mod not in _COMPILED_JVP:
        _COMPILED_JVP[mod] = torch.compile(_eager_jvp_mod if mod else _eager_jvp_plain, dynamic=False)
    return _COMPILED_JVP[mod]


def _apex_fn():
    try:
        from apex.normalization import FusedLayerNorm  # type: ignore
    except ImportError:
        return None
    cache: Dict[int, torch.nn.Module] = {}

    def fn(x, shift, scale, bias, eps=1e-6):
        n = x.shape[-1]
        if n not in cache:
            cache[n] = FusedLayerNorm(n, eps=eps, elementwise_affine=False).to(x.device)
        y = cache[n](x)
        if scale is not None:
            y = y * (1 + scale[:, None]) + shift[:, None]
        return y + bias if bias is not None else y

    return fn


def providers(names: List[str]) -> Dict[str, Callable]:
    from lct_fast.ops import nsln_fused as NF

    out: Dict[str, Callable] = {}

    def fused(impl):
        def fn(x, shift, scale, bias):
            if scale is not None:
                return NF.nsln_modulate_fused(x, shift, scale, bias, impl=impl)
            return NF.nsln_fused(x, bias, impl=impl)
        return fn

    for n in names:
        if n == "eager":
            out[n] = _eager
        elif n == "compile":
            out[n] = torch.compile(_eager, dynamic=False)
        elif n == "apex":
            fn = _apex_fn()
            if fn is not None:
                out[n] = fn
            else:
                print("apex not installed: skipping the apex provider")
        elif n == "triton":
            out[n] = fused("triton")
        elif n == "cuda":
            ok, why = NF.cuda_ops_loaded()
            if ok:
                out[n] = fused("cuda")
            else:
                print(f"CUDA extension unavailable ({why}): skipping the cuda provider")
        else:
            raise SystemExit(f"unknown provider {n!r}")
    return out


def _time(fn: Callable[[], object], reps: int) -> float:
    """Median ms over reps (CUDA events), after warm-up; L2 is not flushed (inputs ≫ L2 for most shapes)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def bench_shape(name, B, T, N, mod, dtype, provs, reps, peak):
    dev = "cuda"
    if "compile" in provs:
        # Dynamo allows 8 recompiles per code object and each shape costs 2 (no-grad fwd, grad fwd+bwd):
        # without a reset, later shapes would silently run eager under the "compile" label.
        torch._dynamo.reset()
    g = torch.Generator(device=dev).manual_seed(0)
    shp = (B, T, N) if mod else (B, N)
    x = torch.randn(shp, device=dev, dtype=dtype, generator=g)
    xd = torch.randn_like(x)
    dy = torch.randn_like(x)
    bias = torch.randn(N, device=dev, dtype=dtype, generator=g) * 0.1
    shift = torch.randn(B, N, device=dev, dtype=dtype, generator=g) * 0.1 if mod else None
    scale = torch.randn(B, N, device=dev, dtype=dtype, generator=g) * 0.1 if mod else None
    e = x.element_size()
    xb = x.numel() * e
    pb = (bias.numel() + (2 * shift.numel() if mod else 0)) * e
    bytes_ = {"fwd": 2 * xb + pb, "bwd": 3 * xb + 2 * pb, "fwd+bwd": 5 * xb + 3 * pb, "jvp": 4 * xb + 2 * pb}
    rows = []
    for pname, fn in provs.items():
        leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale, bias) if t is not None]

        def call(*ts):
            if mod:
                return fn(ts[0], ts[1], ts[2], ts[3])
            return fn(ts[0], None, None, ts[1])

        def fwd():
            with torch.no_grad():
                call(*leaves)

        def fwdbwd():
            y = call(*leaves)
            torch.autograd.backward(y, dy, inputs=leaves)

        def jvp():
            if pname == "compile":
                with torch.no_grad():
                    if mod:
                        return _compiled_jvp(True)(x, shift, scale, bias, xd, shift, scale)
                    return _compiled_jvp(False)(x, bias, xd)
            with torch.no_grad(), fwAD.dual_level():
                if mod:
                    out = fn(fwAD.make_dual(x, xd), fwAD.make_dual(shift, shift), fwAD.make_dual(scale, scale), bias)
                else:
                    out = fn(fwAD.make_dual(x, xd), None, None, bias)
                return fwAD.unpack_dual(out)

        res = {}
        try:
            res["fwd"] = _time(fwd, reps)
            res["fwd+bwd"] = _time(fwdbwd, reps)
            res["bwd"] = max(res["fwd+bwd"] - res["fwd"], 1e-6)
        except Exception as exc:  # a provider failing on one shape must not kill the run
            print(f"  {pname}: fwd/bwd failed: {type(exc).__name__}: {exc}")
        try:
            res["jvp"] = _time(jvp, reps)
        except Exception as exc:
            print(f"  {pname}: jvp failed: {type(exc).__name__}: {str(exc)[:200]}")
        for mode, ms in res.items():
            gbs = bytes_[mode] / ms / 1e6
            rows.append({"shape": name, "B": B, "T": T, "N": N, "dtype": str(dtype).split(".")[-1],
                         "provider": pname, "mode": mode, "ms": round(ms, 4), "GB/s": round(gbs, 1),
                         "%peak": round(100 * gbs / peak, 1) if peak else ""})
    return rows


def cpu_sanity() -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from lct_fast import ops
    from lct_fast.ops import nsln_fused as NF

    x, b = torch.randn(3, 37), torch.randn(37)
    err = (NF.nsln_fused(x, b) - ops.nsln_reference(x, b)).abs().max().item()
    print(f"CPU sanity (Triton interpreter): max |fused − reference| = {err:.3g}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--providers", default="eager,compile,apex,triton,cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    ap.add_argument("--cpu-sanity", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_nsln: no CUDA device; GPU timings need a GPU (use --cpu-sanity for an interpreter check).")
        if args.cpu_sanity:
            cpu_sanity()
        return 0
    from benchmarks.harness import machine_info, machine_string, write_results

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    gpu = torch.cuda.get_device_name(0)
    peak = peak_gbs(gpu)
    provs = providers([p.strip() for p in args.providers.split(",") if p.strip()])
    shapes = [SHAPES[i] for i in QUICK] if args.quick else SHAPES
    info = machine_info()
    print(machine_string(info), f"| peak {peak} GB/s" if peak else "| peak bandwidth unknown")
    rows = []
    for s in shapes:
        r = bench_shape(*s, dtype, provs, args.reps, peak)
        rows += r
        for row in r:
            print(f"{row['shape']:<22} {row['provider']:<8} {row['mode']:<8} {row['ms']:>9.4f} ms "
                  f"{row['GB/s']:>8.1f} GB/s {row['%peak']!s:>6}%")
    if rows and not args.no_write:
        paths = write_results(f"bench_nsln-{args.dtype}", rows, info=info,
                              notes=f"NsLN providers, {args.dtype}; GB/s from compulsory bytes; peak {peak} GB/s.")
        print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
