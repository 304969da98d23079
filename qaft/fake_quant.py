"""Fake-quantized linear layers with a straight-through estimator (STE).

Forward: the weight goes through `ptq.formats.fake_quantize_with` (the same grid and arithmetic as
PTQ's RTN and GPTQ), so a layer computes exactly what its converted, truly quantized twin computes.
Backward: rounding has zero gradient almost everywhere, so the STE (Bengio et al. 2013) passes the
output gradient to the latent weight unchanged, dL/dW = dL/dW_hat; the clipped STE zeroes it
where W lies outside its block's representable range [lo, hi] (where W_hat is constant in W).
With learnable scales (LSQ, Esser et al. 2020, arXiv 1902.08153) the scale s of each block gets
  dW_hat/ds = (W_hat - W * inside) / s        (round(W/s) - W/s inside the range, q_edge outside)
summed over the block and multiplied by LSQ's step-size gradient scale 1 / sqrt(block * qmax).

Scales: "dynamic" recomputes min/max scales from the current weight every forward (RTN at every
step); "fixed" keeps the scales it was initialized with (from RTN, the MSE clip search, or a GPTQ
solution); "learned" makes them parameters (LSQ). Zero points stay fixed in "fixed"/"learned".
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ptq.apply import FilterFn, in_decoder_blocks
from ptq.formats import (ClipSearch, QParams, QuantizedTensor, QuantSpec, compute_qparams,
                         expand_blocks, fake_quantize_with, inside_range, parse_spec,
                         quantize, sum_blocks)

__all__ = ["FakeQuantLinear", "prepare", "convert", "fake_quant_layers", "SCALE_MODES",
           "INITS"]

SCALE_MODES = ("dynamic", "fixed", "learned")
INITS = ("rtn", "mse")


class _FakeQuantSTE(torch.autograd.Function):
    """W_hat = fake_quantize_with(W, (scale, zero), spec); straight-through backward."""

    @staticmethod
    def forward(ctx, weight, scale, zero, spec, clipped, lsq):
        p = QParams(scale, zero)
        w_hat = fake_quantize_with(weight, p, spec)
        need_mask = clipped or lsq
        inside = None
        if need_mask:
            inside = inside_range(weight, p, spec)
        ctx.spec, ctx.clipped, ctx.lsq = spec, clipped, lsq
        ctx.save_for_backward(weight, w_hat if lsq else None, scale if lsq else None, inside)
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        weight, w_hat, scale, inside = ctx.saved_tensors
        spec = ctx.spec
        grad_w = grad * inside if ctx.clipped else grad
        grad_s = None
        if ctx.lsq:
            s = expand_blocks(scale, weight.shape, spec)
            d = (w_hat - weight * inside) / s
            block = weight.numel() // scale.numel()
            top = spec.qmax if spec.kind == "int" else spec.float_max
            grad_s = sum_blocks(grad * d, spec).to(scale.dtype) / math.sqrt(block * top)
        return grad_w, grad_s, None, None, None, None


class FakeQuantLinear(nn.Module):
    """A Linear whose weight is fake-quantized on every forward. It shares the weight (and bias)
    Parameter with the Linear it was made from; `to_linear()` gives that Linear back."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec | str, *, scale_mode: str = "dynamic",
                 init: str | QuantizedTensor = "rtn", clipped_ste: bool = True):
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode={scale_mode!r}: use one of {SCALE_MODES}")
        self.spec = parse_spec(spec)
        self.spec.check_shape(linear.in_features, "this layer")
        self.linear = linear  # shares weight and bias; restored by to_linear
        self.scale_mode = scale_mode
        self.clipped_ste = clipped_ste
        if isinstance(init, QuantizedTensor):
            if init.spec != self.spec or init.codes.shape != linear.weight.shape:
                raise ValueError(f"init QuantizedTensor is {init.spec} {tuple(init.codes.shape)};"
                                 f" the layer needs {self.spec} {tuple(linear.weight.shape)}")
            if scale_mode == "dynamic":
                raise ValueError("a GPTQ/PTQ initialization needs scale_mode 'fixed' or 'learned'"
                                 " (dynamic min/max scales would discard its scales)")
            p = QParams(init.scale.float(), None if init.zero is None else init.zero.float())
            with torch.no_grad():  # start where the PTQ solution ended
                linear.weight.copy_(init.dequantize().to(linear.weight.dtype))
        elif init in INITS:
            clip = ClipSearch() if init == "mse" else None
            p = compute_qparams(linear.weight.detach(), self.spec, clip)
        else:
            raise ValueError(f"init={init!r}: use 'rtn', 'mse' or a QuantizedTensor")
        scale = p.scale.to(torch.float32)
        if scale_mode == "learned":
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero", None if p.zero is None else p.zero.to(torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec | str, **kwargs) -> "FakeQuantLinear":
        return cls(linear, spec, **kwargs)

    def to_linear(self) -> nn.Linear:
        """The original Linear (its weight holds the latent, not yet snapped, values)."""
        return self.linear

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def qparams(self) -> QParams:
        if self.scale_mode == "dynamic":
            return compute_qparams(self.linear.weight.detach(), self.spec)
        return QParams(self.scale, self.zero)

    def quantized_weight(self) -> torch.Tensor:
        """W_hat with the STE attached (what forward multiplies by)."""
        p = self.qparams()
        return _FakeQuantSTE.apply(self.linear.weight, p.scale, p.zero, self.spec,
                                   self.clipped_ste, self.scale_mode == "learned")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.linear.bias)

    @torch.no_grad()
    def quantize(self) -> QuantizedTensor:
        """Codes and scales of the current weight (exactly what forward uses)."""
        p = self.qparams()
        return quantize(self.linear.weight, self.spec, qparams=QParams(p.scale.detach(), p.zero))

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, out_features={self.linear.out_features}, "
                f"spec={self.spec}, scale_mode={self.scale_mode}, clipped_ste={self.clipped_ste}")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare(model: nn.Module, spec: QuantSpec | str, filter_fn: FilterFn | None = None, *,
            scale_mode: str = "dynamic", init: str | dict[str, QuantizedTensor] = "rtn",
            clipped_ste: bool = True) -> dict[str, FakeQuantLinear]:
    """Swap the selected nn.Linear layers (default: those in the decoder blocks) for
    FakeQuantLinear in place; `init` may map layer names to PTQ solutions (e.g. GPTQ's
    `SequentialResult.quantized`). Returns {name: FakeQuantLinear}."""
    spec = parse_spec(spec)
    keep: Callable = filter_fn if filter_fn is not None else in_decoder_blocks(model)
    chosen = [(n, m) for n, m in model.named_modules()
              if type(m) is nn.Linear and keep(m, n)]
    if not chosen:
        raise ValueError("no nn.Linear matched; check filter_fn (GPT-2's Conv1D layers are not "
                         "supported by qaft yet)")
    for name, module in chosen:
        spec.check_shape(module.in_features, name)
    if isinstance(init, dict):
        missing = [n for n, _ in chosen if n not in init]
        if missing:
            raise ValueError(f"init has no PTQ solution for {missing[:3]}... ({len(missing)})")
    swapped = {}
    for name, module in chosen:
        layer_init = init[name] if isinstance(init, dict) else init
        fq = FakeQuantLinear(module, spec, scale_mode=scale_mode, init=layer_init,
                             clipped_ste=clipped_ste)
        _swap(model, name, fq)
        swapped[name] = fq
    return swapped


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@torch.no_grad()
def convert(model: nn.Module) -> dict[str, QuantizedTensor]:
    """Snap every FakeQuantLinear's weight onto its grid for good and swap the plain Linear back.
    Returns {name: QuantizedTensor} (the codes, for `ptq.checkpoint.save_quantized`)."""
    codes = {}
    for name, fq in fake_quant_layers(model).items():
        qt = fq.quantize()
        linear = fq.to_linear()
        linear.weight.copy_(qt.dequantize().to(linear.weight.dtype))
        _swap(model, name, linear)
        codes[name] = qt
    return codes
