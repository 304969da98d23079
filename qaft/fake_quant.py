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
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq.errors import OptionsError
from ptq.formats import (ClipSearch, QParams, QuantizedTensor, QuantSpec, compute_qparams,
                         expand_blocks, fake_quantize_with, inside_range, parse_spec,
                         quantize, sum_blocks)
from ptq.layers import FilterFn, linear_weight, select_linears, set_linear_weight

__all__ = ["FakeQuantLinear", "QAFTConfig", "prepare", "convert", "fake_quant_layers",
           "SCALE_MODES", "INITS"]

SCALE_MODES = ("dynamic", "fixed", "learned")
INITS = ("rtn", "mse", "gptq")


@dataclass(frozen=True)
class QAFTConfig:
    """How quantization-aware fine-tuning quantizes: where it starts and what its scales do."""

    init: str = field(default="rtn", metadata={
        "help": "where quantization starts: rtn (min/max scales), mse (MSE-clipped scales) or "
                "gptq (the GPTQ solution on the same budget)"})
    scale_mode: str | None = field(default=None, metadata={
        "help": "dynamic (min/max of the current weight every step), fixed (the initial "
                "scales) or learned (LSQ); default: dynamic for rtn, fixed for mse and gptq"})
    clipped_ste: bool = field(default=True, metadata={
        "help": "no gradient for weights outside their block's representable range"})

    def __post_init__(self):
        if self.init not in INITS:
            raise OptionsError(f"init={self.init!r}: use one of {', '.join(INITS)}")
        if self.scale_mode is not None and self.scale_mode not in SCALE_MODES:
            raise OptionsError(f"scale_mode={self.scale_mode!r}: use one of "
                               f"{', '.join(SCALE_MODES)}")
        if self.init != "rtn" and self.scale_mode == "dynamic":
            raise OptionsError(f"init={self.init} with scale_mode=dynamic would discard the "
                               f"{self.init} scales at the first step (dynamic recomputes "
                               "min/max scales); use scale_mode fixed or learned, or init rtn")

    @property
    def scales(self) -> str:
        """The scale mode in effect."""
        if self.scale_mode is not None:
            return self.scale_mode
        return "dynamic" if self.init == "rtn" else "fixed"


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
    """A linear layer (nn.Linear, or GPT-2's Conv1D, which stores its weight transposed) whose
    weight is fake-quantized on every forward. It shares the weight (and bias) Parameter with the
    layer it was made from; `to_linear()` gives that layer back."""

    wraps_linear = True  # the tree walker (ptq.layers) does not descend into it

    def __init__(self, linear: nn.Module, spec: QuantSpec | str, *, scale_mode: str = "dynamic",
                 init: str | QuantizedTensor = "rtn", clipped_ste: bool = True):
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise OptionsError(f"scale_mode={scale_mode!r}: use one of {SCALE_MODES}")
        self.spec = parse_spec(spec)
        weight = linear_weight(linear)  # (out, in) view
        self.spec.check_shape(weight.shape[1], "this layer")
        self.linear = linear  # shares weight and bias; restored by to_linear
        self.scale_mode = scale_mode
        self.clipped_ste = clipped_ste
        if isinstance(init, QuantizedTensor):
            if init.spec != self.spec or init.codes.shape != weight.shape:
                raise OptionsError(f"init QuantizedTensor is {init.spec} "
                                   f"{tuple(init.codes.shape)}; the layer needs {self.spec} "
                                   f"{tuple(weight.shape)}")
            if scale_mode == "dynamic":
                raise OptionsError("a GPTQ/PTQ initialization needs scale_mode 'fixed' or "
                                   "'learned' (dynamic min/max scales would discard its scales)")
            p = QParams(init.scale.float(), None if init.zero is None else init.zero.float())
            set_linear_weight(linear, init.dequantize())  # start where the PTQ solution ended
        elif init in ("rtn", "mse"):
            clip = ClipSearch() if init == "mse" else None
            p = compute_qparams(weight.detach(), self.spec, clip)
        else:
            raise OptionsError(f"init={init!r}: use 'rtn', 'mse' or a QuantizedTensor")
        scale = p.scale.to(torch.float32)
        if scale_mode == "learned":
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero", None if p.zero is None else p.zero.to(torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec | str, **kwargs) -> "FakeQuantLinear":
        return cls(linear, spec, **kwargs)

    def to_linear(self) -> nn.Module:
        """The original layer (its weight holds the latent, not yet snapped, values)."""
        return self.linear

    @property
    def weight(self) -> nn.Parameter:
        """The latent Parameter, in the wrapped layer's own layout ((in, out) for Conv1D)."""
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def qparams(self) -> QParams:
        if self.scale_mode == "dynamic":
            return compute_qparams(linear_weight(self.linear).detach(), self.spec)
        return QParams(self.scale, self.zero)

    def quantized_weight(self) -> torch.Tensor:
        """W_hat (out, in) with the STE attached (what forward multiplies by)."""
        p = self.qparams()
        return _FakeQuantSTE.apply(linear_weight(self.linear), p.scale, p.zero, self.spec,
                                   self.clipped_ste, self.scale_mode == "learned")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.linear.bias)

    @torch.no_grad()
    def quantize(self) -> QuantizedTensor:
        """Codes and scales of the current weight (exactly what forward uses)."""
        p = self.qparams()
        return quantize(linear_weight(self.linear), self.spec,
                        qparams=QParams(p.scale.detach(), p.zero))

    def extra_repr(self) -> str:
        out_features, in_features = linear_weight(self.linear).shape
        return (f"in_features={in_features}, out_features={out_features}, "
                f"spec={self.spec}, scale_mode={self.scale_mode}, clipped_ste={self.clipped_ste}")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare(model: nn.Module, spec: QuantSpec | str, config: QAFTConfig = QAFTConfig(), *,
            filter_fn: FilterFn | None = None,
            solution: dict[str, QuantizedTensor] | None = None) -> dict[str, FakeQuantLinear]:
    """Swap the selected linear layers (default: those in the decoder blocks, through the one
    tree walker `ptq.layers.quantizable_linears`) for FakeQuantLinear in place. With
    config.init "gptq", `solution` maps every selected layer to its PTQ solution (e.g.
    `ptq.quantize_model(..., "gptq", calib=...).quantized`). Returns {name: FakeQuantLinear}."""
    spec = parse_spec(spec)
    if fake_quant_layers(model):
        raise OptionsError("the model already holds fake-quantized layers; call qaft.convert "
                           "(or start from a fresh model) before preparing it again")
    chosen = select_linears(model, filter_fn)
    for name, module in chosen:
        spec.check_shape(linear_weight(module).shape[1], name)
    if (config.init == "gptq") != (solution is not None):
        raise OptionsError("init gptq starts from a PTQ solution: pass solution={layer: "
                           "QuantizedTensor} with it, and only with it")
    if solution is not None:
        missing = [n for n, _ in chosen if n not in solution]
        if missing:
            raise OptionsError(f"the solution has no layer {missing[0]} ({len(missing)} of "
                               f"{len(chosen)} missing); quantize the same layers first")
    swapped = {}
    for name, module in chosen:
        layer_init = solution[name] if solution is not None else config.init
        fq = FakeQuantLinear(module, spec, scale_mode=config.scales, init=layer_init,
                             clipped_ste=config.clipped_ste)
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
        set_linear_weight(linear, qt.dequantize())
        _swap(model, name, linear)
        codes[name] = qt
    return codes
