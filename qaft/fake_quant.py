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
solution); "learned" makes them parameters (LSQ). Zero points stay fixed in "fixed"/"learned",
unless `learn_zero`.

Learned zero points (learn_zero, asymmetric int grids with learned scales; LSQ+, Bhalgat et al.
2020, arXiv 2004.09576, in the form EfficientQAT uses): z is a float parameter in code units, used
rounded, z_r = clamp(round(z), 0, qmax), so the forward stays PTQ's integer-zero grid and converts
to integer codes; round and clamp pass the gradient straight through. From
W_hat = (clamp(round(W/s) + z_r, 0, qmax) - z_r) * s:
  dW_hat/dz = 0 inside the range (W_hat = round(W/s) * s does not depend on z), -s outside
  (W_hat = (q_edge - z_r) * s),
summed over the block and scaled by the same 1 / sqrt(block * qmax) as the scale (LSQ+ does so).
The scale's gradient is unchanged (z_r is constant in s). z moves about lr code units per AdamW
step, so at lr 1e-4 a zero point needs thousands of steps to cross a rounding boundary.

The clipped STE under dynamic scales (clip_dynamic): the range [lo, hi] = [-z s, (qmax - z) s]
with the rounded zero point z (or [qmin s, qmax s] of a symmetric grid, whose qmax s is below the
absmax) misses the group's own [min, max] by up to half a step. Measured on Gaussian groups
(tests/qaft/test_ste_extremes.py): one of the two extremes of nearly every asymmetric group counts
as outside (50% of the extremes at int2/3/4-g64; 30-47% with -sym, the positive one), with 4.2% /
0.8% / 0.3% of the other weights (those within half a step of the edge at int2 / int3 / int4), and
they lose their gradient at every step, although the grid is rebuilt from these very weights and
the clamp changes nothing for them beyond a rounding tie (they round to the edge code). With
clip_dynamic=False every weight counts as inside under dynamic scales (nothing lies outside its
group's own [min, max], so the clipped STE is the plain STE there); weights outside a fixed or
learned range still get no gradient. The default True keeps the gradients the published figures
were made with.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq.errors import OptionsError
from ptq.formats import (ClipSearch, QParams, QuantizedTensor, QuantSpec, compute_qparams,
                         fake_quantize_with, inside_range, parse_spec,
                         quantize, sum_blocks)
from ptq.layers import FilterFn, linear_weight, select_linears, set_linear_weight

from . import fused

__all__ = ["FakeQuantLinear", "QAFTConfig", "prepare", "convert", "fake_quant_layers",
           "weights_computed_once", "SCALE_MODES", "INITS"]

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
    clip_dynamic: bool = field(default=True, metadata={
        "help": "with dynamic scales, the clipped STE also drops the gradient of the group "
                "extremes that the rounded zero point (or the symmetric grid) leaves just "
                "outside the range; false: under dynamic scales every weight keeps its gradient "
                "(the group's min/max define the range)"})
    learn_zero: bool = field(default=False, metadata={
        "help": "learn the zero points too (LSQ+: a float zero point, rounded in the forward "
                "with a straight-through gradient); needs scale_mode learned and an asymmetric "
                "int grid"})

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
        if self.learn_zero and self.scales != "learned":
            raise OptionsError(f"learn_zero learns the zero points beside learned scales; "
                               f"scale_mode is {self.scales}: use scale_mode learned")

    @property
    def scales(self) -> str:
        """The scale mode in effect."""
        if self.scale_mode is not None:
            return self.scale_mode
        return "dynamic" if self.init == "rtn" else "fixed"


class _FakeQuantSTE(torch.autograd.Function):
    """W_hat = fake_quantize_with(W, (scale, zero), spec); straight-through backward. Float32 CPU
    weights on integer grids take the fused kernels (qaft.fused), the same numbers in one pass
    each way; there W_hat comes in `out_dtype` (bfloat16 under autocast: the cast autocast
    would make, made in the same pass)."""

    @staticmethod
    def forward(ctx, weight, scale, zero, spec, clipped, lsq, learn_zero, out_dtype):
        if learn_zero:  # a float zero point, used rounded onto the integer codes
            zero = torch.round(zero).clamp(spec.qmin, spec.qmax)
        p = QParams(scale, zero)
        ctx.spec, ctx.clipped, ctx.lsq, ctx.learn_zero = spec, clipped, lsq, learn_zero
        ctx.weight_dtype = weight.dtype  # W_hat may come in another (out_dtype)
        ctx.fused = fused.usable(weight, spec)
        if ctx.fused:  # its backward recomputes the mask and W_hat from W
            ctx.save_for_backward(weight, scale, zero)
            return fused.fake_quantize(weight, p, spec, out_dtype)
        w_hat = fake_quantize_with(weight, p, spec)
        inside = inside_range(weight, p, spec) if clipped or lsq else None
        ctx.save_for_backward(weight, w_hat if lsq else None, scale if lsq else None, inside)
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        if not (ctx.clipped or ctx.lsq):  # the plain STE
            return grad.to(ctx.weight_dtype), None, None, None, None, None, None, None
        if ctx.fused:
            weight, scale, zero = ctx.saved_tensors
            grad_w, sum_s, sum_z = fused.ste_backward(grad, weight, QParams(scale, zero),
                                                      ctx.spec, ctx.clipped, ctx.lsq,
                                                      ctx.learn_zero)
        else:
            weight, w_hat, scale, inside = ctx.saved_tensors
            # where(), not grad * inside: a bool factor is first copied to a float tensor
            grad_in = torch.where(inside, grad, 0.0)
            grad_w = grad_in if ctx.clipped else grad
            sum_s = sum_z = None
            if ctx.lsq:
                # sum over the block of grad * (W_hat - W * inside)
                sum_s = sum_blocks(torch.mul(grad, w_hat).addcmul_(grad_in, weight, value=-1),
                                   ctx.spec)
                if ctx.learn_zero:
                    sum_z = sum_blocks(grad - grad_in, ctx.spec)
        grad_s = grad_z = None
        if ctx.lsq:
            # dW_hat/ds = (W_hat - W * inside) / s, and s leaves the block sum: one division
            # per block, no weight-sized s
            spec = ctx.spec
            block = weight.numel() // scale.numel()
            lsq = 1 / math.sqrt(block * (spec.qmax if spec.kind == "int" else spec.float_max))
            grad_s = (sum_s / scale).to(scale.dtype) * lsq
            if ctx.learn_zero:  # dW_hat/dz: 0 inside the range, -s outside
                grad_z = -(sum_z * scale).to(scale.dtype) * lsq
        return grad_w, grad_s, grad_z, None, None, None, None, None


class FakeQuantLinear(nn.Module):
    """A linear layer (nn.Linear, or GPT-2's Conv1D, which stores its weight transposed) whose
    weight is fake-quantized on every forward. It shares the weight (and bias) Parameter with the
    layer it was made from; `to_linear()` gives that layer back."""

    wraps_linear = True  # the tree walker (ptq.layers) does not descend into it

    def __init__(self, linear: nn.Module, spec: QuantSpec | str, *, scale_mode: str = "dynamic",
                 init: str | QuantizedTensor = "rtn", clipped_ste: bool = True,
                 clip_dynamic: bool = True, learn_zero: bool = False):
        super().__init__()
        self._w_hat = None  # W_hat held by weights_computed_once
        if scale_mode not in SCALE_MODES:
            raise OptionsError(f"scale_mode={scale_mode!r}: use one of {SCALE_MODES}")
        self.spec = parse_spec(spec)
        if learn_zero:
            _check_learn_zero(self.spec, scale_mode)
        weight = linear_weight(linear)  # (out, in) view
        self.spec.check_shape(weight.shape[1], "this layer")
        self.linear = linear  # shares weight and bias; restored by to_linear
        self.scale_mode = scale_mode
        self.clipped_ste = clipped_ste
        self.clip_dynamic = clip_dynamic
        self.learn_zero = learn_zero
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
        # copies: training must not change the QuantizedTensor (or weight) it started from
        scale = p.scale.detach().to(torch.float32, copy=True)
        if scale_mode == "learned":
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        zero = None if p.zero is None else p.zero.detach().to(torch.float32, copy=True)
        if learn_zero:
            self.zero = nn.Parameter(zero)
        else:
            self.register_buffer("zero", zero)

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
        """The scales and zero points the forward uses (a learned zero point rounded)."""
        if self.scale_mode == "dynamic":
            return compute_qparams(linear_weight(self.linear).detach(), self.spec)
        if self.learn_zero:
            zero = torch.round(self.zero.detach()).clamp(self.spec.qmin, self.spec.qmax)
            return QParams(self.scale, zero)
        return QParams(self.scale, self.zero)

    def quantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_hat (out, in) with the STE attached (what forward multiplies by), in the weight's
        dtype; `dtype` bfloat16 asks for it rounded to bfloat16, which the fused kernels make in
        the same pass (the eager path gives the weight's dtype, which autocast then casts)."""
        if self._w_hat is not None and not torch.is_grad_enabled():
            return self._w_hat
        p = self.qparams()
        # under dynamic scales nothing lies outside the group's own [min, max] (clip_dynamic)
        clipped = self.clipped_ste and (self.clip_dynamic or self.scale_mode != "dynamic")
        zero = self.zero if self.learn_zero else p.zero  # the STE rounds a learned one
        return _FakeQuantSTE.apply(linear_weight(self.linear), p.scale, zero, self.spec,
                                   clipped, self.scale_mode == "learned", self.learn_zero, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under bfloat16 autocast the product runs in bfloat16: W_hat can come rounded already
        kind = x.device.type
        low = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
        w_hat = self.quantized_weight(torch.bfloat16 if low else None)
        return nn.functional.linear(x, w_hat, self.linear.bias)

    @torch.no_grad()
    def quantize(self) -> QuantizedTensor:
        """Codes and scales of the current weight (exactly what forward uses)."""
        p = self.qparams()
        return quantize(linear_weight(self.linear), self.spec,
                        qparams=QParams(p.scale.detach(), p.zero))

    def extra_repr(self) -> str:
        out_features, in_features = linear_weight(self.linear).shape
        return (f"in_features={in_features}, out_features={out_features}, "
                f"spec={self.spec}, scale_mode={self.scale_mode}, clipped_ste={self.clipped_ste}"
                f"{'' if self.clip_dynamic else ', clip_dynamic=False'}"
                f"{', learn_zero=True' if self.learn_zero else ''}")


@contextmanager
def weights_computed_once(model: nn.Module):
    """Inside the block, every fake-quantized layer of `model` computes W_hat once and reuses
    it in passes without gradients: for measurements that run the model, its blocks and its
    weights several times while nothing changes them (a probe). Passes with gradients compute
    W_hat as always; the held copies (one per layer) are dropped on the way out."""
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    with torch.no_grad():
        for m in layers:
            m._w_hat = m.quantized_weight()
    try:
        yield
    finally:
        for m in layers:
            m._w_hat = None


def _check_learn_zero(spec: QuantSpec, scale_mode: str) -> None:
    if spec.kind != "int" or spec.symmetric:
        raise OptionsError(f"learn_zero learns the zero points of an asymmetric int grid; "
                           f"{spec} has none: use a spec such as int3-g64, or learn_zero false")
    if scale_mode != "learned":
        raise OptionsError(f"learn_zero needs scale_mode 'learned', not {scale_mode!r}")


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
    if config.learn_zero:
        _check_learn_zero(spec, config.scales)  # before any layer is swapped
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
                             clipped_ste=config.clipped_ste, clip_dynamic=config.clip_dynamic,
                             learn_zero=config.learn_zero)
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
