"""The check every PTQ method's result passes before it touches the model, built-in or not.

A method returns the dequantized weight and, normally, its codes and scales (`QuantResult`).
`check_result` stops, with one line naming the method and the layer:
  - a result that is not a QuantResult (a block method: a layer missing from its dict);
  - a weight of the wrong shape, a non-float dtype, NaN or Inf;
  - codes of the wrong shape, spec or dtype, codes outside the grid's range (int grids),
    scales that are not finite and positive, zero points outside the codes' range;
  - a weight that its own codes do not reproduce (the model would hold something other than what
    a checkpoint or an export stores);
  - a weight returned without codes that is not on the spec's grid: such a result gets its codes
    from each block's own min/max or, on integer grids, from the coarsest grid through 0 and the
    block's extremes that holds every value of the block (what `fake_quantize`, with or without
    clipping, produces); it is refused when neither reproduces it.
It returns the codes the layer holds afterwards.
"""

from __future__ import annotations

import torch

from .errors import QalignError
from .formats import (QParams, QuantizedTensor, QuantSpec, _blocked, _code_dtype, dequantize,
                      quantize)
from .registry import QuantResult

__all__ = ["MethodResultError", "check_result"]


class MethodResultError(QalignError):
    """A PTQ method returned something the model must not take."""


def _tolerance(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Rounding slack between two computations of one grid point: a few ulps of the largest
    value."""
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    return 4 * eps * float(ref.abs().max()) if ref.numel() else 0.0


def check_result(method: str, layer: str, W: torch.Tensor, res, spec: QuantSpec
                 ) -> QuantizedTensor:
    """The codes of `res` (method `method` on layer `layer`, whose weight was W), checked; raises
    MethodResultError naming both when anything is off (module docstring)."""
    where = f"method {method!r} on layer {layer}"
    if not isinstance(res, QuantResult):
        raise MethodResultError(f"{where} returned {type(res).__name__}, not a QuantResult; "
                                "return ptq.QuantResult(weight, quantized=codes)")
    w = res.weight
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        what = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise MethodResultError(f"{where} returned a weight of {what}; return the dequantized "
                                "weight as a float tensor")
    if tuple(w.shape) != tuple(W.shape):
        raise MethodResultError(f"{where} returned a weight of shape {tuple(w.shape)} for a layer "
                                f"of shape {tuple(W.shape)} (out, in)")
    if not bool(torch.isfinite(w).all()):
        raise MethodResultError(f"{where} returned {int((~torch.isfinite(w)).sum())} NaN/Inf "
                                "weight value(s); nothing was written")
    qt = res.quantized
    if qt is None:
        return _codes_of_weight(where, w, spec)
    _check_codes(where, qt, W, spec)
    deq = dequantize(qt).float()
    gap = float((deq - w.float()).abs().max())
    if gap > _tolerance(deq, w.dtype):
        raise MethodResultError(f"{where}: its codes dequantize to a weight up to {gap:.3g} away "
                                "from the weight it returned; return weight=dequantize(codes)")
    return qt


def _check_codes(where: str, qt, W: torch.Tensor, spec: QuantSpec) -> None:
    if not isinstance(qt, QuantizedTensor):
        raise MethodResultError(f"{where} returned quantized={type(qt).__name__}; give a "
                                "ptq.QuantizedTensor (e.g. from ptq.quantize) or None")
    if qt.spec != spec:
        raise MethodResultError(f"{where} returned codes on {qt.spec}, but the run's spec is "
                                f"{spec}")
    if tuple(qt.codes.shape) != tuple(W.shape) or qt.codes.dtype != _code_dtype(spec):
        raise MethodResultError(f"{where} returned codes {tuple(qt.codes.shape)} "
                                f"{qt.codes.dtype}; {spec} needs {tuple(W.shape)} "
                                f"{_code_dtype(spec)} (build them with ptq.quantize)")
    rows, cols = W.shape[0], W.shape[-1]
    expected = {"channel": (rows, 1), "tensor": (1, 1)}.get(
        spec.granularity, (rows, cols // max(spec.group_size, 1)))
    if tuple(qt.scale.shape) != expected:
        raise MethodResultError(f"{where} returned scales of shape {tuple(qt.scale.shape)}; "
                                f"{spec} on ({W.shape[0]}, {W.shape[1]}) has {expected}")
    scale = qt.scale.float()
    if not bool(torch.isfinite(scale).all() & (scale > 0).all()):
        raise MethodResultError(f"{where} returned scales that are not all finite and > 0")
    if spec.kind == "int":
        for what, t in (("codes", qt.codes), ("zero points", qt.zero)):
            if t is None:
                continue
            lo, hi = int(t.min()), int(t.max())
            if lo < spec.qmin or hi > spec.qmax:
                raise MethodResultError(f"{where} returned {what} {lo}..{hi}, outside "
                                        f"{spec}'s {spec.qmin}..{spec.qmax}")
        if (qt.zero is None) != spec.symmetric:
            raise MethodResultError(f"{where}: {spec} {'has no' if spec.symmetric else 'needs'} "
                                    "zero points")
    elif int(qt.codes.min()) < 0 or int(qt.codes.max()) >= 2 ** spec.bits:
        raise MethodResultError(f"{where} returned bit patterns outside {spec}'s {spec.bits} bits")


def _codes_of_weight(where: str, w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Codes of a weight returned without them (module docstring): the min/max grid of each
    block, else (integer grids) the coarsest grid through 0 and the block's extremes on which
    every value of the block lies; refused when neither reproduces the weight."""
    for qt in (quantize(w, spec), _integer_grid(w, spec)):
        if qt is None:
            continue
        deq = dequantize(qt).float()
        gap = float((deq - w.float()).abs().max())
        if gap <= _tolerance(deq, w.dtype):
            return qt
    raise MethodResultError(
        f"{where} returned a weight that is not on {spec}'s grid (up to {gap:.3g} from the "
        "nearest grid its blocks' values allow); return its codes and scales too: "
        "QuantResult(weight, quantized=ptq.quantize(W, spec, qparams=...))")


def _integer_grid(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor | None:
    """For an integer grid: per block, the scale s = range / k with the smallest k (1..levels)
    that puts every value within 1e-3 steps of an integer multiple of s, and its zero point.
    None for floating-point grids."""
    if spec.kind != "int":
        return None
    wb = _blocked(w.double(), spec)
    lo, hi = wb.amin(-1, keepdim=True).clamp(max=0), wb.amax(-1, keepdim=True).clamp(min=0)
    if spec.symmetric:  # the larger side sets the range: -qmin steps below 0, qmax above
        span, steps = torch.where(-lo > hi, -lo, hi), torch.where(-lo > hi, -spec.qmin, spec.qmax)
    else:
        span, steps = hi - lo, torch.full_like(hi, spec.qmax)
    scale = torch.ones_like(span)
    found = span == 0  # an all-zero block: any scale
    for k in range(1, int(steps.max()) + 1):
        s = span / k
        x = wb / torch.where(s > 0, s, torch.ones_like(s))
        ok = ((x - x.round()).abs() <= 1e-3).all(-1, keepdim=True) & (k <= steps) & ~found
        scale = torch.where(ok, s, scale)
        found |= ok
    if not bool(found.all()):
        return None
    zero = None if spec.symmetric else torch.round(-lo / scale).clamp(0, spec.qmax)
    p = QParams(scale.squeeze(-1).float(), None if zero is None else zero.squeeze(-1).float())
    return quantize(w, spec, qparams=p)
