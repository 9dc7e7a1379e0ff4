"""The activation memory model (lct_fast.profiler.memory) against the bytes autograd actually saves for backward
(saved-tensor hooks), for the DiT in the precisions and options the presets use."""

import contextlib

import pytest
import torch

from lct_fast.config import load_config
from lct_fast.profiler.memory import SavedTensorMeter, activation_model, dit_activation_bytes
from lct_fast.models import build_backbone

BASE = ["model.depth=3", "model.width=128", "model.heads=2", "model.resolution=16", "model.dropout=0"]


def _saved_by_forward(cfg, dtype: str, batch: int = 2) -> int:
    m = cfg.model
    torch.manual_seed(0)
    net = build_backbone(m).train()
    if dtype == "bf16_weights":
        net = net.bfloat16()
    x = torch.randn(batch, m.in_channels, m.resolution, m.resolution,
                    dtype=torch.bfloat16 if dtype == "bf16_weights" else torch.float32)
    meter = SavedTensorMeter(net.parameters())
    # bf16 weights run under autocast as well (the trainer keeps it on with DeepSpeed's bf16 engine): the
    # fp32 islands (time embedding) then take bf16 inputs, and no weight needs a copy
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype != "fp32" else contextlib.nullcontext()
    with amp, meter.active():
        net(x, torch.rand(batch), torch.zeros(batch, dtype=torch.long), dropout_seed=1)
    return meter.bytes


# measured / model (torch 2.14 CPU, these shapes): 1.003-1.028; the model leaves out the per-sample adaLN
# vectors, a share that falls with the token count (1.003 at 256 tokens)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16_weights"])
@pytest.mark.parametrize("sets", [[], ["model.dropout=0.25"], ["model.checkpointing=true"],
                                  ["model.norm=layernorm", "model.dropout=0.1"],
                                  ["model.width=192", "model.heads=3", "model.resolution=32"]],
                         ids=["plain", "dropout", "checkpointing", "layernorm", "wider"])
def test_dit_activation_model_matches_saved_tensors(sets, dtype):
    cfg = load_config("s", BASE + sets)
    got = _saved_by_forward(cfg, dtype)
    model = dit_activation_bytes(cfg.model, 2, act_bytes=4 if dtype == "fp32" else 2,
                                 checkpointing=cfg.model.checkpointing, autocast_copies=dtype == "bf16")
    predicted = model["saved"] + model["weight_copies"]
    assert predicted == pytest.approx(got, rel=0.04), (predicted, got)
    if cfg.model.checkpointing:  # only the blocks' inputs are kept; one block's set comes back in backward
        full = dit_activation_bytes(cfg.model, 2, act_bytes=4 if dtype == "fp32" else 2,
                                    checkpointing=False,
                                    autocast_copies=dtype == "bf16")
        assert model["saved"] < full["saved"] / 5 and model["recompute"] > 0
        assert model["peak"] < full["peak"]


def test_activations_scale_with_batch_and_depth_but_copies_do_not():
    cfg = load_config("s", BASE)
    one, two = (dit_activation_bytes(cfg.model, b, act_bytes=2, checkpointing=False,
                                     autocast_copies=True) for b in (1, 2))
    assert two["saved"] == pytest.approx(2 * one["saved"]) and two["weight_copies"] == one["weight_copies"]
    assert _saved_by_forward(cfg, "bf16", batch=4) - _saved_by_forward(cfg, "bf16", batch=2) == pytest.approx(
        2 * one["saved"], rel=0.04)


def test_the_jvp_pass_saves_nothing_for_backward():
    """The sCT tangent runs without gradients: its memory is transient, never added to the backward's."""
    from lct_fast.methods.sct import sct_tangent
    from lct_fast.models.precond import TrigFlowPrecond

    cfg = load_config("s", BASE)
    net = TrigFlowPrecond(build_backbone(cfg.model), time_scale=1.0)
    b = 2
    x = torch.randn(b, 4, 16, 16)
    meter = SavedTensorMeter(net.parameters())
    with meter.active():
        sct_tangent(net, x, torch.full((b,), 0.7), torch.randn_like(x), torch.zeros(b, dtype=torch.long),
                    sigma_data=0.5, r=1.0, g_norm_c=0.1, jvp_dtype="fp32")
    assert meter.bytes == 0
    model = activation_model(load_config("s", BASE), b)
    assert model["jvp_transient"] > 0 and model["peak"] >= model["jvp_transient"]


def test_activation_model_follows_the_precision_plan():
    s = load_config("s", BASE)  # bf16 autocast over fp32 weights
    assert activation_model(s, 2)["weight_copies"] > 0
    fp32 = activation_model(load_config("s", BASE + ["train.precision=fp32"]), 2)
    assert fp32["weight_copies"] == 0 and fp32["saved"] > activation_model(s, 2)["saved"]
    # the reference attention under forward-mode AD holds L x L arrays: only the JVP transient grows
    ref = activation_model(s, 2, attention_fused=False)
    fused = activation_model(s, 2)
    assert ref["jvp_transient"] > fused["jvp_transient"] and ref["saved"] == fused["saved"]
    assert activation_model(load_config("tiny", ["model.arch=unet"]), 2) is None  # no model for the UNet


def test_meter_takes_each_forward_between_backwards_on_its_own():
    """Gradient accumulation: two forward/backward pairs are two passes of the same size, not their sum (nor
    a sum that reused storage addresses confuse)."""
    cfg = load_config("s", BASE)
    torch.manual_seed(0)
    net = build_backbone(cfg.model).train()
    x = torch.randn(2, 4, 16, 16)
    one = _saved_by_forward(cfg, "fp32")
    meter = SavedTensorMeter(net.parameters())
    with meter.active():
        for _ in range(2):
            net(x, torch.rand(2), torch.zeros(2, dtype=torch.long)).square().sum().backward()
    assert meter.forward_passes == 2 and meter.bytes == pytest.approx(one, rel=0.01)
