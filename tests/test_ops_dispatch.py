"""Backend dispatcher: fallback to reference, auto order, forward-AD gating, default backend."""
import logging

import pytest
import torch

from lct_fast import ops


@pytest.fixture(autouse=True)
def _clean_registry():
    # Each test starts with only the reference backends and leaves the registry as it found it: the real
    # Triton/CUDA registrations made at import must survive for the kernel tests that run later.
    from lct_fast.ops import dispatch

    saved = {op: dict(entries) for op, entries in dispatch._REGISTRY.items()}
    for op in ("nsln", "nsln_modulate", "attention"):
        for name in ("triton", "cuda"):
            ops.unregister_backend(op, name)
    yield
    dispatch._REGISTRY.clear()
    dispatch._REGISTRY.update(saved)
    ops.set_default_backend("auto")
    ops.reset_backend_log()


def test_missing_explicit_backend_falls_back_with_warning(caplog):
    x, b = torch.randn(2, 8), torch.zeros(8)
    with caplog.at_level(logging.INFO, logger="lct_fast.ops"):
        with pytest.warns(RuntimeWarning, match="nsln: triton unavailable .*using reference"):
            y = ops.nsln(x, b, backend="triton")
    torch.testing.assert_close(y, ops.nsln_reference(x, b))
    assert any("using reference" in r.getMessage() for r in caplog.records)
    assert ops.chosen_backend("nsln", "triton", x, b) == "reference"


def test_unavailable_registered_backend_reports_reason():
    ops.register_backend("nsln", "triton", lambda x, b, eps: x * 0,
                         available=lambda *t: (t[0].is_cuda, "no CUDA device"))
    x, b = torch.randn(2, 8), torch.zeros(8)
    name, reason = ops.explain_backend("nsln", "triton", x, b)
    assert name == "reference" and "no CUDA device" in reason and "triton unavailable" in reason
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        y = ops.nsln(x, b, backend="triton")
    torch.testing.assert_close(y, ops.nsln_reference(x, b))


def test_auto_prefers_cuda_then_triton_then_reference():
    x, b = torch.randn(2, 8), torch.zeros(8)
    assert ops.chosen_backend("nsln", "auto", x, b) == "reference"
    ops.register_backend("nsln", "triton", lambda x, b, eps: x + 1.0)
    assert ops.chosen_backend("nsln", "auto", x, b) == "triton"
    torch.testing.assert_close(ops.nsln(x, b), x + 1.0)  # the registered fn is really called
    ops.register_backend("nsln", "cuda", lambda x, b, eps: x + 2.0)
    assert ops.chosen_backend("nsln", "auto", x, b) == "cuda"
    ops.register_backend("nsln", "cuda", lambda x, b, eps: x + 2.0, available=lambda *t: False)
    assert ops.chosen_backend("nsln", "auto", x, b) == "triton"


def test_default_backend_and_forward_ad_gating():
    x, b = torch.randn(2, 8), torch.zeros(8)
    ops.register_backend("nsln", "triton", lambda x, b, eps: x * 0 + 5.0, supports_forward_ad=False)
    ops.set_default_backend("reference")
    assert ops.chosen_backend("nsln", "auto", x, b) == "reference"
    assert ops.chosen_backend("nsln", "triton", x, b) == "triton"  # explicit request wins
    ops.set_default_backend("auto")
    seen = []

    def f(a):
        seen.append(ops.chosen_backend("nsln", "auto", a, b))
        return ops.nsln(a, b)

    torch.func.jvp(f, (x,), (torch.ones_like(x),))
    assert seen == ["reference"]  # the triton fn has no forward-AD rule
    assert not ops.forward_ad_active(x)


def test_bad_backend_names():
    with pytest.raises(ValueError, match="not one of"):
        ops.nsln(torch.randn(2, 4), None, backend="fast")
    with pytest.raises(ValueError, match="not one of"):
        ops.set_default_backend("gpu")
    with pytest.raises(ValueError):
        ops.register_backend("nsln", "auto", lambda *a: None)
