"""Fused NsLN kernels against the PyTorch reference: forward, every gradient, the JVP.

On a CPU machine the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest) on CPU tensors,
called explicitly (the dispatcher never picks them for CPU tensors). On a GPU the same checks run on CUDA
for both the Triton and the CUDA C++ backends (``@pytest.mark.gpu``), plus a DiT step fused vs reference.
Accuracy criterion: error vs a float64 evaluation at most ~2× the reference op's own error in that dtype.
"""
import importlib.util
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from lct_fast import ops
from lct_fast.ops import nsln_fused as NF

HAS_CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not (HAS_CUDA or INTERP),
                                reason="triton missing, or no GPU and TRITON_INTERPRET unset")

DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, width): odd row counts and widths (7, DiT widths 384/1536, non-power-of-two 1000, 4096)
SHAPES = [(1, 7), (3, 384), (33, 7), (3, 1000), (1, 1536), (2, 4096)]


def _impls():
    out = ["triton"]
    if HAS_CUDA and NF.cuda_ops_loaded()[0]:
        out.append("cuda")
    return out


def _data(shape, dtype, seed, mod_b=None, scale=3.0, offset=1.5):
    """x with a non-zero mean (exercises the centring), bias/shift/scale of size ~1."""
    g = torch.Generator().manual_seed(seed)
    rows, n = shape
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * scale + offset)
    d = dict(x=x, bias=torch.randn(n, generator=g, dtype=torch.float64) * 0.5)
    if mod_b is not None:
        d["shift"] = torch.randn(mod_b, n, generator=g, dtype=torch.float64) * 0.5
        d["scale"] = torch.randn(mod_b, n, generator=g, dtype=torch.float64) * 0.5
    tan = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in d.items()}
    cast = lambda t: t.to(DEV, dtype)  # noqa: E731
    return {k: cast(v) for k, v in d.items()}, {k: cast(v) for k, v in tan.items()}


def _ref(d, exact=False):
    """Reference op on the same inputs; exact=True evaluates it in float64 (the ground truth)."""
    c = (lambda t: t.double()) if exact else (lambda t: t)
    if "scale" in d:
        b = d["scale"].shape[0]
        x = c(d["x"])
        x3 = x.view(b, -1, x.shape[-1])
        return ops.nsln_modulate_reference(x3, c(d["shift"]), c(d["scale"]), c(d["bias"])).view(x.shape)
    return ops.nsln_reference(c(d["x"]), c(d["bias"]))


def _fused(d, impl):
    if "scale" in d:
        b = d["scale"].shape[0]
        x3 = d["x"].view(b, -1, d["x"].shape[-1])
        return NF.nsln_modulate_fused(x3, d["shift"], d["scale"], d["bias"], impl=impl).view(d["x"].shape)
    return NF.nsln_fused(d["x"], d["bias"], impl=impl)


def _err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _assert_as_good(ours, ref, exact, dtype, what):
    """max|ours − exact| ≤ 2·max|ref − exact| + a small floor (fp32 rounding of the statistics)."""
    floor = {torch.float32: 2e-5, torch.bfloat16: 1e-6, torch.float16: 1e-6}[dtype]
    if INTERP and not HAS_CUDA and ours.dtype == torch.bfloat16:
        # triton 3.9's interpreter truncates fp32→bf16 (GPU Triton rounds to nearest): allow one bf16 ulp
        floor = 2.0 ** -7
    scale = max(1.0, exact.abs().max().item())
    e_ours, e_ref = _err(ours, exact), _err(ref, exact)
    assert e_ours <= 2 * e_ref + floor * scale, f"{what}: fused error {e_ours:.3g} vs reference {e_ref:.3g}"


def _grads(fn, d, dy, exact=False):
    """Gradients of <fn(d), dy>; exact=True takes them on float64 leaves (not rounded to the input dtype)."""
    if exact:
        d, dy = {k: v.double() for k, v in d.items()}, dy.double()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in d.items()}
    out = fn(leaves)
    names = list(leaves)
    gs = torch.autograd.grad(out, [leaves[k] for k in names], dy)
    return out.detach(), dict(zip(names, gs))


@pytest.fixture
def small_split():
    """Lower the split-row threshold so the long-row path runs at interpreter-friendly widths."""
    old = NF.set_split_threshold(64)
    yield 64
    NF.set_split_threshold(old)


def _check_all(d, t, impl, dtype, *, grads=True):
    rows, n = d["x"].shape
    ours, ref, exact = _fused(d, impl), _ref(d), _ref(d, exact=True)
    assert ours.dtype == dtype and ours.shape == (rows, n)
    _assert_as_good(ours, ref, exact, dtype, "forward")
    if grads:
        g = torch.Generator().manual_seed(7)
        dy = torch.randn(rows, n, generator=g, dtype=torch.float64).to(DEV, dtype)
        _, g_ours = _grads(lambda L: _fused(L, impl), d, dy)
        _, g_ref = _grads(_ref, d, dy)
        _, g_ex = _grads(lambda L: _ref(L, exact=True), d, dy, exact=True)
        for k in d:
            assert g_ours[k].dtype == d[k].dtype
            _assert_as_good(g_ours[k], g_ref[k], g_ex[k], dtype, f"grad {k}")
    # JVP: torch.func.jvp through NsLNFunction.jvp
    names = list(d)
    prim, tang = tuple(d[k] for k in names), tuple(t[k] for k in names)
    _, jd_ours = torch.func.jvp(lambda *a: _fused(dict(zip(names, a)), impl), prim, tang)
    _, jd_ref = torch.func.jvp(lambda *a: _ref(dict(zip(names, a))), prim, tang)
    _, jd_ex = torch.func.jvp(lambda *a: _ref(dict(zip(names, a)), exact=True), prim, tang)
    _assert_as_good(jd_ours, jd_ref, jd_ex, dtype, "torch.func.jvp tangent")
    # forward_ad dual tensors under no_grad: the single primal+tangent kernel
    with torch.no_grad(), fwAD.dual_level():
        out = _fused({k: fwAD.make_dual(d[k], t[k]) for k in names}, impl)
        p_ours, t_ours = fwAD.unpack_dual(out)
        assert t_ours is not None
    _assert_as_good(p_ours, ref, exact, dtype, "forward_ad primal")
    _assert_as_good(t_ours, jd_ref, jd_ex, dtype, "forward_ad tangent")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", _impls())
def test_nsln_forward_grads_jvp(impl, shape, dtype):
    d, t = _data(shape, dtype, seed=shape[0] * 31 + shape[1])
    _check_all(d, t, impl, dtype, grads=shape[0] * shape[1] <= 20000 or dtype == torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,b", [((6, 384), 2), ((3, 7), 3), ((4, 1000), 1), ((2, 1536), 2)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("impl", _impls())
def test_nsln_modulate_forward_grads_jvp(impl, shape, b, dtype):
    d, t = _data(shape, dtype, seed=11 + shape[1], mod_b=b)
    _check_all(d, t, impl, dtype)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("shape,b", [((2, 100), None), ((3, 1000), None), ((4, 333), 2), ((1, 3000), 1)],
                         ids=lambda v: str(v))
def test_split_row_path(impl, shape, b, small_split):
    """Rows wider than the threshold: chunk moments combined per row (Chan), then the apply kernel."""
    d, t = _data(shape, torch.float32, seed=5 + shape[1], mod_b=b, scale=2.0, offset=40.0)
    _check_all(d, t, impl, torch.float32)


def test_257_rows():
    """An odd, larger row count (the interpreter runs one program per row, so fp32 and one op only)."""
    d, t = _data((257, 7), torch.float32, seed=257)
    _check_all(d, t, "triton", torch.float32)


@pytest.mark.parametrize("split", [True, False])
def test_stats_are_stable_for_large_offsets(split, request):
    """mean ≫ std (1e3 vs 1e-2): the chunked variance must not cancel (E[x²] − μ² would lose every digit in
    fp32), and the mean's sum must not lose the deviations. Rounding the mean itself to fp32 costs up to
    0.5·ulp(1e3)/σ ≈ 3e-3 in x̂; with the sum taken about a pivot the rest is ≤ ~2e-5 (the variance about the
    rounded mean, at |x̂| ≈ 4), so that plus 1 % is the bound. For scale: torch's fp32 layer_norm 2.3e-3 on CPU (ours 2.15e-3); the unshifted sum
    4.7e-3 / 6.8e-3 one-pass / split under the interpreter and ~7e-3 split on an H200. torch's error is not
    the bound here: any fp32 mean is off by up to the floor, by luck of rounding less on some inputs."""
    if split:
        request.getfixturevalue("small_split")
    g = torch.Generator().manual_seed(3)
    n = 8192
    x = (torch.randn(4, n, generator=g, dtype=torch.float64) * 1e-2 + 1e3).float()
    exact = ops.nsln_reference(x.double(), None)
    floor = 0.5 * (torch.finfo(torch.float32).eps * 512) / x.double().std(-1).min().item()
    assert _err(NF.nsln_fused(x.to(DEV), None), exact) <= 1.01 * floor


def test_tangent_matches_spec_formula():
    """The fused tangent equals SPEC §4's ẋ̂ (nsln_tangent_reference) for plain NsLN without bias."""
    d, t = _data((5, 300), torch.float32, seed=2)
    _, yd = torch.ops.lct_fast.nsln_jvp_triton(d["x"], t["x"], None, None, None, None, None, None, 1e-6, False, 8192)
    spec = ops.nsln_tangent_reference(d["x"].double(), t["x"].double())
    assert _err(yd, spec) < 2e-5


def test_partial_tangents_and_grads():
    """Only some inputs carry tangents / require grad: the missing ones are treated as zero."""
    d, t = _data((4, 50), torch.float32, seed=9, mod_b=2)
    x3 = d["x"].view(2, 2, 50)

    def f(scale):
        return NF.nsln_modulate_fused(x3, d["shift"], scale, d["bias"])

    def r(scale):
        return ops.nsln_modulate_reference(x3.double(), d["shift"].double(), scale, d["bias"].double())

    _, yd = torch.func.jvp(f, (d["scale"],), (t["scale"],))
    _, yd_ref = torch.func.jvp(r, (d["scale"].double(),), (t["scale"].double(),))
    assert _err(yd, yd_ref) < 1e-5
    sc = d["scale"].clone().requires_grad_()
    (g,) = torch.autograd.grad(f(sc).sum(), [sc])
    sc64 = d["scale"].double().requires_grad_()
    (g_ref,) = torch.autograd.grad(r(sc64).sum(), [sc64])
    assert _err(g, g_ref) < 1e-4


def test_forward_ad_with_grad_enabled_uses_function_jvp():
    """Dual tensors while grad is needed go through NsLNFunction (backward and jvp both available)."""
    d, t = _data((3, 64), torch.float32, seed=4)
    x = d["x"].clone().requires_grad_()
    with fwAD.dual_level():
        out = NF.nsln_fused(fwAD.make_dual(x, t["x"]), d["bias"])
        p, tan = fwAD.unpack_dual(out)
    exp_t = torch.func.jvp(lambda a: ops.nsln_reference(a, d["bias"].double()), (d["x"].double(),),
                           (t["x"].double(),))[1]
    assert _err(tan, exp_t) < 1e-5
    (gx,) = torch.autograd.grad(p.sum() + (p * p).sum(), [x])
    x64 = d["x"].double().requires_grad_()
    p64 = ops.nsln_reference(x64, d["bias"].double())
    (gx_ref,) = torch.autograd.grad(p64.sum() + (p64 * p64).sum(), [x64])
    assert _err(gx, gx_ref) < 1e-4


def test_mixed_dtypes_params_fp32_x_bf16():
    """bf16 activations with fp32 bias/shift/scale (autocast-style): output bf16, grads in param dtypes."""
    d, _ = _data((4, 96), torch.bfloat16, seed=13, mod_b=2)
    for k in ("bias", "shift", "scale"):
        d[k] = d[k].float()
    ours, ref, exact = _fused(d, "triton"), _ref(d), _ref(d, exact=True)
    assert ours.dtype == torch.bfloat16
    _assert_as_good(ours, ref, exact, torch.bfloat16, "mixed forward")
    dy = torch.ones(4, 96, dtype=torch.bfloat16, device=DEV)
    _, g = _grads(lambda L: _fused(L, "triton"), d, dy)
    _, g_ex = _grads(lambda L: _ref(L, exact=True), d, dy, exact=True)
    assert g["bias"].dtype == torch.float32 and g["scale"].dtype == torch.float32
    for k in ("bias", "shift", "scale"):
        assert _err(g[k], g_ex[k]) < 1e-2 * max(1.0, g_ex[k].abs().max().item())


def test_custom_ops_pass_opcheck():
    """Schemas and fake (meta) implementations are consistent: torch.compile can trace around them."""
    d, t = _data((4, 40), torch.float32, seed=1, mod_b=2)
    x = d["x"]
    torch.library.opcheck(torch.ops.lct_fast.nsln_fwd_triton, (x, d["bias"], d["shift"], d["scale"], 1e-6, 8192))
    torch.library.opcheck(torch.ops.lct_fast.nsln_jvp_triton,
                          (x, t["x"], d["bias"], None, d["shift"], d["scale"], None, t["scale"], 1e-6, True, 8192))
    _, mean, rstd = torch.ops.lct_fast.nsln_fwd_triton(x, d["bias"], d["shift"], d["scale"], 1e-6, 8192)
    torch.library.opcheck(torch.ops.lct_fast.nsln_bwd_triton,
                          (t["x"], x, mean, rstd, d["scale"], 2, True, True, True, True, 8192))


def test_fake_impls_give_shapes_on_meta():
    x = torch.empty(6, 10, device="meta", dtype=torch.bfloat16)
    s = torch.empty(2, 10, device="meta")
    y, m, r = torch.ops.lct_fast.nsln_fwd_triton(x, None, s, s, 1e-6, 8192)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and m.shape == (6,) and m.dtype == torch.float32
    dx, db, dsh, dsc = torch.ops.lct_fast.nsln_bwd_triton(x, x, m, r, s, 2, True, False, True, True, 8192)
    assert dx.shape == x.shape and db.numel() == 0 and dsh.shape == (2, 10) and dsc.shape == (2, 10)


def test_backends_registered_and_unavailable_on_cpu_tensors():
    for op in ("nsln", "nsln_modulate"):
        assert {"reference", "triton", "cuda"} <= set(ops.registered_backends(op))
    x = torch.randn(2, 8)
    ok, why = NF.triton_available(x)
    assert not ok and "CUDA" in why
    ok, why = NF.cuda_available(x)
    assert not ok
    if not HAS_CUDA:
        assert ops.chosen_backend("nsln", "auto", x, None) == "reference"
        with pytest.warns(RuntimeWarning, match="triton unavailable"):
            ops.reset_backend_log()
            y = ops.nsln(x, None, backend="triton")
        torch.testing.assert_close(y, ops.nsln_reference(x, None))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="bias must have shape"):
        NF.nsln_fused(x, torch.zeros(7))
    with pytest.raises(ValueError, match="float64"):
        NF.nsln_fused(x.double(), None)
    with pytest.raises(ValueError, match=r"shift must have shape \[B, N\]"):
        NF.nsln_modulate_fused(x, torch.zeros(3, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="unknown fused implementation"):
        NF.nsln_fused(x, None, impl="vulkan")


def _force_backend(monkeypatch, impl):
    """Make the dispatcher pick ``impl`` for CPU tensors (interpreter) — restored by monkeypatch."""
    from lct_fast.ops import dispatch

    for op, fn in (("nsln", NF._backend_fns(impl)[0]), ("nsln_modulate", NF._backend_fns(impl)[1])):
        entries = dict(dispatch._REGISTRY[op])
        entries[impl] = dispatch._Entry(fn, lambda *ts: True, True)
        monkeypatch.setitem(dispatch._REGISTRY, op, entries)
    dispatch.reset_backend_log()


def _dit_step(model, x, sigma, labels):
    model.zero_grad(set_to_none=True)
    out = model(x, sigma, labels)
    loss = (out.float() ** 2).mean()
    loss.backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _dit_models(device, dtype=torch.float32, **kw):
    from lct_fast.config import MethodConfig
    from lct_fast.methods import build_model
    # (not "tests.model_helpers": torch-fidelity 0.4.0 installs a top-level package named "tests")
    from model_helpers import randomize, small_cfg

    cfg = small_cfg("dit", **kw)
    model = randomize(build_model(cfg, MethodConfig(name="sct")), seed=0).to(device, dtype)
    return model


@pytest.mark.parametrize("impl", _impls())
def test_dit_step_fused_matches_reference(monkeypatch, impl):
    """A small DiT forward/backward and its sCT-style forward-AD JVP with the fused op vs the reference."""
    model = _dit_models(DEV)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(DEV)
    t = torch.rand(2, generator=g).to(DEV) * 1.5
    labels = torch.tensor([0, 2], device=DEV)
    out_ref, g_ref = _dit_step(model, x, t, labels)
    with torch.no_grad(), fwAD.dual_level():
        jv_ref = fwAD.unpack_dual(model.F(fwAD.make_dual(x, torch.ones_like(x)), fwAD.make_dual(t, torch.ones_like(t)),
                                          labels)).tangent
    _force_backend(monkeypatch, impl)
    calls = []
    real_apply = NF._apply
    monkeypatch.setattr(NF, "_apply", lambda *a, **k: calls.append(1) or real_apply(*a, **k))
    out, g_f = _dit_step(model, x, t, labels)
    with torch.no_grad(), fwAD.dual_level():
        jv = fwAD.unpack_dual(model.F(fwAD.make_dual(x, torch.ones_like(x)), fwAD.make_dual(t, torch.ones_like(t)),
                                      labels)).tangent
    assert calls, "the fused op was not used by the model"
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(jv, jv_ref, rtol=1e-4, atol=1e-4)
    assert g_f.keys() == g_ref.keys()
    for k in g_ref:
        torch.testing.assert_close(g_f[k], g_ref[k], rtol=1e-3, atol=1e-5, msg=k)


# ---------------------------------------------------------------------------------------------
# GPU only: realistic sizes, bf16, both backends, the UNet's long rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,b", [((8 * 256, 1152), 8), ((4 * 1024, 384), 4), ((2 * 64, 8192), 2),
                                     ((4, 256 * 32 * 32), None), ((2, 1000003), None)], ids=lambda v: str(v))
def test_gpu_realistic_shapes(impl, dtype, shape, b):
    d, t = _data(shape, dtype, seed=shape[1] % 1000, mod_b=b)
    _check_all(d, t, impl, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", _impls())
def test_gpu_dit_bf16_step_backend_auto(impl):
    """bf16 DiT under autocast: the dispatcher picks the fused op; loss and grads track the reference."""
    model = _dit_models("cuda", width=384, depth=2, heads=6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g).cuda()
    t = torch.rand(4, generator=g).cuda()
    labels = torch.tensor([0, 1, 2, 3], device="cuda") % 3
    ops.set_default_backend("reference")
    try:
        with torch.autocast("cuda", torch.bfloat16):
            out_ref, g_ref = _dit_step(model, x, t, labels)
        ops.set_default_backend(impl)
        with torch.autocast("cuda", torch.bfloat16):
            out, g_f = _dit_step(model, x, t, labels)
        assert any(k[3] == impl for k in ops.backend_choices())
    finally:
        ops.set_default_backend("auto")
    assert _err(out, out_ref) < 3e-2 * max(1.0, out_ref.abs().max().item())
    for k in g_ref:
        assert _err(g_f[k], g_ref[k]) < 5e-2 * max(1e-3, g_ref[k].abs().max().item()), k
