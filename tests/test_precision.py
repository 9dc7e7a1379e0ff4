"""TF32 through one switch (lct_fast.precision) and the OT cost kept in IEEE fp32."""

import torch


def test_tf32_switch_keeps_both_torch_apis_readable_and_ot_in_ieee_fp32():
    """set_tf32 goes through torch.set_float32_matmul_precision: the legacy flag and the new API both stay
    readable (mixing them raises in torch >= 2.9); ieee_fp32 restores what was set; the OT cost is exact."""
    from lct_fast.ot import cost_matrix
    from lct_fast.precision import ieee_fp32, set_tf32, tf32_allowed

    set_tf32(True)
    assert tf32_allowed() and torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
    with ieee_fp32():
        assert not tf32_allowed() and torch.get_float32_matmul_precision() == "highest"
    assert tf32_allowed()
    x, z = torch.randn(16, 4, 8, 8, dtype=torch.float64), torch.randn(16, 4, 8, 8, dtype=torch.float64)
    ref = torch.cdist(x.flatten(1), z.flatten(1)).square()
    assert torch.allclose(cost_matrix(x.float(), z.float()).double(), ref, rtol=1e-5, atol=1e-3)
    set_tf32(False)
    assert not tf32_allowed() and not torch.backends.cuda.matmul.allow_tf32
