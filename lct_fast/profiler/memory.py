"""Memory model of a training step: the state ZeRO partitions, and the activations a DiT saves for backward.

Both are closed forms of the config (no model is built), so the profiler can print them beside what a run
measured and the sweep can skip points that cannot fit before it launches them. The activation part is
checked on CPU against the bytes of the tensors autograd actually saves (:class:`SavedTensorMeter`,
saved-tensor hooks), not against RSS, which a ~1 GiB baseline of libraries dominates.

Activations of one DiT block, per token, in elements of the width ``w`` (``r`` = mlp_ratio), read off the
block's autograd graph on the PyTorch reference ops (SDPA saves its output and log-sum-exp, not the L x L
probabilities; what the fused GPU kernels save is not measured here):

* in fp32 whatever the weights (the norms compute in fp32 and keep fp32 copies): the two norms' inputs and
  the two normalised x̂ kept for the modulation's scale gradient -- 4 (an affine ``layernorm`` arm the same);
* in the activation dtype (bf16 under autocast): the qkv input, q, k, v, the attention output (the output
  projection's input is a view of it), the gated branch outputs of attention and MLP, the fc1 input, the
  GELU input and the fc2 input -- 8 + 2r; with dropout its mask adds r;
* per token, fp32: mean and 1/std of both norms (4 values) and the attention's log-sum-exp (one per head).

Left out: the per-sample adaLN vectors (about 4-15 ``w`` per block and sample): measured on CPU they are
under 1 % of the total from 256 tokens on, 7-8 % at the tiny presets' 16 tokens.

Under autocast the bf16 copy of every weight matrix is cached for the forward and saved for backward: 2 bytes
per matrix parameter. With activation checkpointing a block saves only its input (the residual stream, ``w`` per
token, fp32: the DiT adds its fp32 position embedding to the tokens, so the stream is fp32 whatever the
weights) and the backward recomputes one block at a time, so one block's full set is live on top.

The JVP pass of sCT/sCD runs without gradients and saves nothing; its peak is transient: the residual stream
and the widest intermediate (the MLP hidden layer) with their tangents, and, where the attention runs the
PyTorch reference under forward-mode AD (no fused kernel), the L x L scores, probabilities and their tangents
in fp32. That term is an estimate (CPU has no allocator statistics to check it against); it is not additive:
the pass ends before the online forward starts saving.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import torch

from ..registry import get_method

__all__ = ["expected_state_bytes", "dit_matrix_params", "dit_activation_bytes", "activation_model",
           "predicted_bytes", "SavedTensorMeter"]

#: The live L x L fp32 arrays of the reference attention's forward-mode pass: scores, probabilities and
#: their two tangents (an estimate: the JVP pass's peak is transient, not saved).
JVP_REFERENCE_ATTENTION_ARRAYS = 4


def expected_state_bytes(num_params: int, *, stage: int, world: int, bf16_weights: bool, num_emas: int,
                         optimizer_states: int = 2, teacher_params: int = 0) -> Dict[str, float]:
    """Bytes per rank of the training state ZeRO partitions: weights, gradients, optimizer (+ fp32 master
    weights when the weights are bf16), and our fp32 EMAs (which live on the partitions under ZeRO-3); for sCD
    also the frozen fp32 teacher (weights only, partitioned under ZeRO-3 like the student's).

    Stage 1 partitions the optimizer state, 2 also the gradients, 3 also the weights (ZeRO paper, Fig. 1)."""
    w = 2 if bf16_weights else 4
    part = lambda on: 1.0 / world if on else 1.0  # noqa: E731
    out = {"weights": num_params * w * part(stage >= 3),
           "gradients": num_params * w * part(stage >= 2),
           "optimizer": num_params * (4 * optimizer_states + (4 if bf16_weights else 0)) * part(stage >= 1),
           "ema": num_params * 4 * num_emas * part(stage >= 3)}
    if teacher_params:
        out["teacher"] = teacher_params * 4 * part(stage >= 3)
    out["total"] = sum(out.values())
    return out


def _dims(model_cfg: Any) -> tuple[int, int, int, int, int]:
    from ..models.dit import resolve_dit_dims

    d = resolve_dit_dims(model_cfg.size, model_cfg.width, model_cfg.depth, model_cfg.heads)
    tokens = (model_cfg.resolution // model_cfg.patch_size) ** 2
    return d.width, d.depth, d.heads, tokens, int(d.width * model_cfg.mlp_ratio)


def dit_matrix_params(model_cfg: Any, conditions: Any = None) -> tuple[int, int]:
    """Weights of the DiT's matrix products (linear and convolution weights, no biases or embeddings), the
    tensors autocast copies to bf16 once per forward: (per block, outside the blocks)."""
    w, _, _, _, hidden = _dims(model_cfg)
    pc = model_cfg.patch_size ** 2 * model_cfg.in_channels
    block = 3 * w * w + w * w + 2 * w * hidden + 6 * w * w           # qkv, proj, fc1, fc2, adaLN
    # final adaLN and output layer, patch embedding, the time embedding's second layer (its first layer's
    # input, the sinusoidal features, needs no gradient, so autograd keeps no copy of that weight)
    rest = 2 * w * w + w * pc + pc * w + w * w
    from ..models import condition_count

    rest += condition_count(model_cfg, conditions) * w * w  # each extra condition's second layer
    return block, rest


def dit_activation_bytes(model_cfg: Any, micro_batch: int, *, act_bytes: int, checkpointing: bool,
                         attention_fused: bool = True, autocast_copies: bool = False,
                         jvp: bool = False, jvp_act_bytes: Optional[int] = None,
                         jvp_autocast: bool = False, conditions: Any = None) -> Dict[str, float]:
    """The DiT's activation memory for one forward + backward of ``micro_batch`` samples (bytes; see the
    module docstring for the terms): ``saved`` (the activations the forward keeps for backward),
    ``weight_copies`` (autocast's bf16 weights the forward keeps; with checkpointing only those outside the
    blocks), ``recompute`` (one block's activations and weight copies, live while a checkpointed backward
    recomputes it), ``jvp_transient`` (the JVP pass's peak, an estimate; 0 without ``jvp``; its activations
    take ``jvp_act_bytes``, default ``act_bytes``, and it holds autocast's weight copies when
    ``jvp_autocast``) and ``peak``: the largest of the forward's (under checkpointing autocast still caches
    every block's copy until the forward ends), the backward's and the JVP pass's."""
    w, depth, heads, tokens, hidden = _dims(model_cfg)
    r = hidden / w
    per_token_block = (4 * 4 * w + act_bytes * (8 + 2 * r) * w
                       + (act_bytes * r * w if model_cfg.dropout > 0 else 0) + 4 * (4 + heads))
    # the final layer: its norm's input and x̂ (fp32), the output projection's input; the patch embedding's
    # input (p·p·C per token)
    pc = model_cfg.patch_size ** 2 * model_cfg.in_channels
    per_token_rest = 2 * 4 * w + act_bytes * w + 2 * 4 + act_bytes * pc
    block = micro_batch * tokens * per_token_block
    block_copies, rest_copies = (2.0 * n if autocast_copies else 0.0 for n in dit_matrix_params(model_cfg, conditions))
    if checkpointing:
        saved = micro_batch * tokens * (depth * 4 * w + per_token_rest)
        copies, recompute = rest_copies, block + block_copies
    else:
        saved = micro_batch * tokens * per_token_rest + depth * block
        copies, recompute = rest_copies + depth * block_copies, 0.0
    jvp_peak = 0.0
    if jvp:
        # residual stream and the MLP hidden layer, primal + tangent, in the pass's dtype
        jvp_peak = micro_batch * tokens * 2 * (2 * 4 * w + (jvp_act_bytes or act_bytes) * hidden)
        if not attention_fused:
            jvp_peak += micro_batch * heads * tokens * tokens * 4 * JVP_REFERENCE_ATTENTION_ARRAYS
        if jvp_autocast:
            jvp_peak += rest_copies + depth * block_copies
    out = {"saved": float(saved), "recompute": float(recompute), "weight_copies": copies,
           "jvp_transient": float(jvp_peak)}
    out["peak"] = max(saved + rest_copies + depth * block_copies, saved + recompute + copies, jvp_peak)
    return out


def activation_model(cfg: Any, micro_batch: int, *, attention_fused: bool = True) -> Optional[Dict[str, float]]:
    """:func:`dit_activation_bytes` for a run's config on a GPU (its dtypes from the precision plan: bf16
    autocast over fp32 weights, bf16 weights, or fp32), or None for a backbone the model does not cover (the
    UNet)."""
    m = cfg.model
    if m.arch != "dit":
        return None
    bf16_weights = cfg.bf16_weights
    autocast = cfg.train.precision == "bf16" and not bf16_weights
    act = 2 if (autocast or bf16_weights) else 4
    spec = get_method(cfg.method.name)
    half_jvp = spec.jvp and spec.jvp_dtype(cfg.method) in ("bf16", "fp16")  # sct.py _jvp_precision: fp32 turns autocast off
    return dit_activation_bytes(m, micro_batch, act_bytes=act, checkpointing=m.checkpointing,
                                attention_fused=attention_fused, autocast_copies=autocast,
                                jvp=spec.jvp, conditions=spec.conditions(cfg.method),
                                jvp_act_bytes=2 if bf16_weights or half_jvp else 4, jvp_autocast=autocast and half_jvp)


def predicted_bytes(cfg: Any, num_params: int, world: int) -> Dict[str, float]:
    """Bytes per rank a run of ``cfg`` on ``world`` ranks needs at least: the ZeRO-partitioned state plus the
    activation peak of one micro-batch (state only for a backbone without an activation model; an sCD
    teacher counted as large as the student). The sweep skips points above the device's memory with it."""
    stage = cfg.zero_stage
    state = expected_state_bytes(num_params, stage=stage, world=world,
                                 bf16_weights=cfg.bf16_weights,
                                 num_emas=len(cfg.train.ema.decays) + len(cfg.train.ema.power_stds),
                                 teacher_params=num_params if get_method(cfg.method.name).teacher else 0)["total"]
    act = activation_model(cfg, cfg.train.batch_layout(world)[0])
    peak = act["peak"] if act else 0.0
    return {"state": state, "activations": peak, "total": state + peak, "activations_modelled": act is not None}


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward while active, by storage (a storage saved twice, or
    viewed, counts once), leaving out the storages of ``params`` (state, not activations) as they are when
    the tensor is saved -- under ZeRO-3 a parameter's storage is its gathered buffer only while gathered.

    A forward pass is what is saved between two backward passes: the first unpack of a saved tensor (a
    backward has started) closes it, so with gradient accumulation each micro-step's forward is metered on
    its own and :attr:`bytes` is the largest. What a backward itself saves (the recompute of activation
    checkpointing, phases ``backward``/``recompute``) is kept apart, in :attr:`during_backward`.
    ``by_phase`` splits the largest forward by the innermost open :func:`lct_fast.profiler.phases.phase`."""

    _BACKWARD_PHASES = ("backward", "recompute")

    def __init__(self, params: Iterable[torch.Tensor] = (), phase_of: Optional[Callable[[], Optional[str]]] = None):
        self._params = list(params)
        self._phase_of = phase_of
        self._passes: list = [{}]
        self._closed = False
        self.during_backward: Dict[Optional[str], int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta":
            return t
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if any(p.untyped_storage().data_ptr() == ptr for p in self._params):
            return t
        phase = self._phase_of() if self._phase_of else None
        if phase in self._BACKWARD_PHASES:
            self.during_backward[phase] = self.during_backward.get(phase, 0) + s.nbytes()
            return t
        if self._closed:
            self._passes.append({})
            self._closed = False
        self._passes[-1].setdefault(ptr, (s.nbytes(), phase))
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        self._closed = True
        return t

    @contextlib.contextmanager
    def active(self) -> Iterator["SavedTensorMeter"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    def _largest(self) -> dict:
        return max(self._passes, key=lambda p: sum(n for n, _ in p.values()))

    @property
    def bytes(self) -> int:
        """What the largest forward pass saved."""
        return sum(n for n, _ in self._largest().values())

    @property
    def forward_passes(self) -> int:
        return sum(1 for p in self._passes if p)

    @property
    def by_phase(self) -> Dict[Optional[str], int]:
        out: Dict[Optional[str], int] = {}
        for n, p in self._largest().values():
            out[p] = out.get(p, 0) + n
        return out
