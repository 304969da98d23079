"""Quantized training of linear layers: the inputs of all three GEMMs fake-quantized (paper C,
Sun et al. 2025, "Scaling laws for floating-point quantization training", arXiv 2501.02423).

A linear layer computes three GEMMs per training step:
    forward              Y  = X  W^T     inputs P1 = X   (N, in)   P2 = W  (out, in)   reduce over in
    input gradient       dX = dY W       inputs P3 = dY  (N, out)  P4 = W  (out, in)   reduce over out
    weight gradient      dW = dY^T X     inputs P5 = dY  (N, out)  P6 = X  (N, in)     reduce over N
Each position Pk may be rounded to its own spec (`ptq.formats`: e{E}m{M} or int grids) with its
scaling granularity taken along that GEMM's reduction dimension: -g{B} is one scale per B
consecutive elements along it, -ch one per row (per token for X and dY in the forward and input
gradient, per output or input channel for W), -t one per tensor. Rounding is to nearest. The
default targets are the paper's main setting: W in the forward and backward GEMMs (P2, P4) and X
in the weight-gradient GEMM (P6). Gradients flow through each rounding as the identity (the
straight-through estimator); the quantized copies are the GEMMs' inputs only, the FP32 weights
are what the optimizer updates.

`pow2_scales` rounds each block scale up to a power of two (the MX convention): scaling is then
exact, so a format as wide as the data (e8m23 on float32) reproduces nn.Linear bit for bit.

`prepare_qtrain(model, config)` swaps the selected linear layers (the one tree walker) for
`QTrainLinear`, which holds the same weight and bias Parameters under the same names (state dicts
and checkpoints are unchanged); `restore_linears(model)` swaps them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ptq.errors import OptionsError
from ptq.formats import QParams, QuantSpec, compute_qparams, fake_quantize_with, parse_spec
from ptq.layers import FilterFn, select_linears

__all__ = ["POSITIONS", "QTrainConfig", "QTrainLinear", "prepare_qtrain", "restore_linears",
           "qtrain_layers"]

POSITIONS = ("P1", "P2", "P3", "P4", "P5", "P6")
_WHAT = {"P1": "X in the forward GEMM", "P2": "W in the forward GEMM",
         "P3": "dY in the input-gradient GEMM", "P4": "W in the input-gradient GEMM",
         "P5": "dY in the weight-gradient GEMM", "P6": "X in the weight-gradient GEMM"}


@dataclass(frozen=True)
class QTrainConfig:
    """Which GEMM inputs are rounded, and to which spec."""
    spec: str = field(default="e4m3-g128", metadata={
        "help": "spec of every target without its own: e{E}m{M} or int{b}-sym, with -g{B} "
                "(blocks along the reduction dimension), -ch or -t"})
    targets: tuple[str, ...] = field(default=("P2", "P4", "P6"), metadata={
        "help": "positions to quantize: P1 X fwd, P2 W fwd, P3 dY for dX, P4 W for dX, P5 dY "
                "for dW, P6 X for dW (default: the paper's W fwd/bwd and X for dW)"})
    specs: tuple[str, ...] = field(default=(), metadata={
        "help": "per-position specs, POSITION=SPEC (e.g. P6=e5m2-g64), over `spec`"})
    pow2_scales: bool = field(default=False, metadata={
        "help": "round block scales up to powers of two (MX convention)"})

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets) if not isinstance(
            self.targets, str) else (self.targets,))
        object.__setattr__(self, "specs", tuple(self.specs) if not isinstance(
            self.specs, str) else (self.specs,))
        bad = [t for t in self.targets if t not in POSITIONS]
        if bad:
            raise OptionsError(f"targets {bad}: the quantization positions are P1..P6 "
                               f"({'; '.join(f'{p} {w}' for p, w in _WHAT.items())})")
        self.spec_of("P1")  # every spec parses, every override names a position

    def spec_of(self, position: str) -> QuantSpec:
        chosen = self.spec
        for item in self.specs:
            pos, sep, text = item.partition("=")
            if not sep or pos not in POSITIONS:
                raise OptionsError(f"specs item {item!r}: write POSITION=SPEC with POSITION in "
                                   "P1..P6, e.g. P6=e5m2-g64")
            if pos == position:
                chosen = text
        spec = parse_spec(chosen)
        if self.pow2_scales and spec.kind == "int" and not spec.symmetric:
            raise OptionsError(f"{spec}: power-of-two scales need a grid without zero point; "
                               f"use int{spec.bits}-sym or a float format")
        return spec

    def resolved(self) -> dict[str, QuantSpec]:
        return {p: self.spec_of(p) for p in self.targets}


def _round(t: torch.Tensor, spec: QuantSpec | None, pow2: bool, what: str) -> torch.Tensor:
    """t (rows, reduction) rounded along its last dimension, or t itself when spec is None."""
    if spec is None:
        return t
    if spec.granularity == "group" and t.shape[-1] % spec.group_size:
        raise OptionsError(f"{what}: blocks of {spec.group_size} do not divide its reduction "
                           f"dimension of {t.shape[-1]}; choose a block size that divides it "
                           "(for X and dY in the weight gradient that is batch_size x seq_len)"
                           ", or -ch / -t")
    p = compute_qparams(t, spec)
    if pow2:
        p = QParams(torch.exp2(torch.ceil(torch.log2(p.scale))), p.zero)
    return fake_quantize_with(t, p, spec)


class _QLinearFunction(torch.autograd.Function):
    """Y = X W^T + b with the six GEMM inputs rounded as `specs` says (None: exact)."""

    @staticmethod
    def forward(ctx, x, weight, bias, specs: dict, pow2: bool):
        x2 = x.reshape(-1, x.shape[-1])
        y = _round(x2, specs.get("P1"), pow2, "P1 (X, forward)") @ \
            _round(weight, specs.get("P2"), pow2, "P2 (W, forward)").t()
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x2, weight)
        ctx.specs, ctx.pow2, ctx.has_bias, ctx.x_shape = specs, pow2, bias is not None, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight = ctx.saved_tensors
        s, pow2 = ctx.specs, ctx.pow2
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dX = dY W, reduction over out: W's columns are its rows^T
            w_t = _round(weight.t(), s.get("P4"), pow2, "P4 (W, input gradient)")
            grad_x = (_round(gy, s.get("P3"), pow2, "P3 (dY, input gradient)") @ w_t.t())
            grad_x = grad_x.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # dW = dY^T X, reduction over the N tokens
            gy_t = _round(gy.t(), s.get("P5"), pow2, "P5 (dY, weight gradient)")
            x_t = _round(x2.t(), s.get("P6"), pow2, "P6 (X, weight gradient)")
            grad_w = gy_t @ x_t.t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy.sum(0)
        return grad_x, grad_w, grad_b, None, None


class QTrainLinear(nn.Module):
    """nn.Linear whose GEMM inputs are rounded as a QTrainConfig says; same Parameters."""

    def __init__(self, linear: nn.Linear, config: QTrainConfig):
        super().__init__()
        if type(linear) is not nn.Linear:
            raise OptionsError(f"QTrainLinear wraps nn.Linear, not {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied
        self.config = config
        self.specs = config.resolved()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QLinearFunction.apply(x, self.weight, self.bias, self.specs,
                                      self.config.pow2_scales)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                + ", ".join(f"{p}={s}" for p, s in self.specs.items()))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def prepare_qtrain(model: nn.Module, config: QTrainConfig = QTrainConfig(),
                   filter_fn: FilterFn | None = None) -> list[str]:
    """Swap the selected nn.Linear layers (default: every linear of the decoder blocks) for
    QTrainLinear in place; returns their names."""
    layers = select_linears(model, filter_fn)
    odd = [n for n, m in layers if type(m) is not nn.Linear]
    if odd:
        raise OptionsError(f"quantized training swaps nn.Linear layers; {odd[0]} is a "
                           f"{type(model.get_submodule(odd[0])).__name__} (GPT-2's Conv1D is "
                           "not supported); pick a Llama-style model")
    for name, module in layers:
        _set(model, name, QTrainLinear(module, config))
    return [n for n, _ in layers]


def qtrain_layers(model: nn.Module) -> dict[str, QTrainLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QTrainLinear)}


def restore_linears(model: nn.Module) -> nn.Module:
    """Undo prepare_qtrain: plain nn.Linear layers holding the same Parameters."""
    for name, module in qtrain_layers(model).items():
        _set(model, name, module.to_linear())
    return model
