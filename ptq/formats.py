"""The one quantization grid of the toolkit: quantize, dequantize, fake-quantize onto a spec.

Every method (RTN, GPTQ, the STE layers of `qaft`, the evaluators) rounds through the functions
here, so "int3-g64" means exactly the same set of representable weights everywhere.

The spec strings ("int3-g64", "e2m1-g32", ...) and `QuantSpec` are defined in `ptq.spec` and
re-exported here, so `from ptq.formats import parse_spec, QuantSpec, SpecError` keeps working.
This module holds what is done with a spec: per-block scales (min/max, or the MSE clip search
of `ClipSearch`), rounding onto the integer or ExMy grid, the codes and `QuantizedTensor`,
and the block helpers the methods and the STE share.
A weight is (out_features, in_features); tensors of other ranks are read as (prod(leading), last).

Arithmetic is float32, except formats whose range leaves float32 (E = 8), which use float64.
`quantize` and `compute_qparams` refuse NaN/Inf weights (NonFiniteError); finite ones near the
dtype's largest value (+-3e38 in float32) get scales whose grid stays finite (_params_from_range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral

import torch

from .errors import NonFiniteError, OptionsError, QalignError  # noqa: F401
from .spec import (_SPEC_HELP, _SPEC_RE, EXP_BITS, FLOAT_ALIASES, INT_BITS,  # noqa: F401
                   MAN_BITS, QuantSpec, SpecError, parse_spec)

__all__ = [
    "SpecError",
    "QuantSpec",
    "QParams",
    "QuantizedTensor",
    "ClipSearch",
    "check_finite",
    "parse_spec",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_with",
    "fake_quantize_broadcast",
    "representable_range",
    "inside_range",
    "expand_blocks",
    "sum_blocks",
]


# --- blocks -----------------------------------------------------------------------------------
def _blocked(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View w as (rows, n_blocks, block) in the compute dtype; one scale per (row, block)."""
    if w.dim() == 0:
        raise SpecError("cannot quantize a 0-d tensor; give a weight of shape (out, in)")
    w2 = w.reshape(-1, w.shape[-1]).to(spec.compute_dtype)
    rows, cols = w2.shape
    if spec.granularity == "tensor":
        return w2.reshape(1, 1, rows * cols)
    if spec.granularity == "channel":
        return w2.reshape(rows, 1, cols)
    spec.check_shape(cols, f"the tensor of shape {tuple(w.shape)}")
    return w2.reshape(rows, cols // spec.group_size, spec.group_size)


@dataclass
class QParams:
    """Scales (and integer zero points) of one tensor, shape (rows, n_blocks): (out, 1) for -ch,
    (out, in/G) for -g, (1, 1) for -t. `zero` is None for symmetric and float grids."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None


@dataclass(frozen=True)
class ClipSearch:
    """MSE clipping search: shrink each block's range by factors 1, 1 - max_shrink/grid, ...,
    1 - max_shrink and keep, per block, the factor with the lowest sum |w - w_hat|^norm."""

    grid: int = 20
    max_shrink: float = 0.2
    norm: float = 2.0

    def __post_init__(self):
        if isinstance(self.grid, bool) or not isinstance(self.grid, Integral) or self.grid < 1:
            raise OptionsError(f"ClipSearch.grid={self.grid!r} must be an integer >= 1, e.g. 20")
        if not 0.0 < self.max_shrink < 1.0:  # also refuses NaN
            raise OptionsError(f"ClipSearch.max_shrink={self.max_shrink} is not in (0, 1); try 0.2")
        if not 0.0 < self.norm < math.inf:
            raise OptionsError(f"ClipSearch.norm={self.norm} must be finite and > 0; 2 is MSE")


def check_finite(t: torch.Tensor, what: str = "the weight", hint: str = (
        "check the checkpoint it was loaded from, or the method that ran before this one")) -> None:
    """Raise NonFiniteError with the count of NaN/Inf in t and the (row, column) of the first (t
    as (prod(leading), last)). If all is well: one min/max pass, 10x faster than isfinite.all."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        return
    bad = ~torch.isfinite(t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1))
    row, col = (int(i) for i in bad.nonzero()[0])
    raise NonFiniteError(f"{what} of shape {tuple(t.shape)} holds {int(bad.sum())} NaN/Inf "
                         f"value(s), the first at row {row}, column {col}; {hint}")


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                       limit: float = math.inf) -> QParams:
    """Scales for blocks whose values lie in [lo, hi]; lo, hi have shape (rows, n_blocks, 1).
    A block whose grid would reach past `limit` (the dtype's largest value: hi - lo or some
    code's w_hat overflows) takes the scales of its range shrunk by k, which bound every w_hat
    by limit (1 - 1/qmax^2) (asym), limit (top + 1/2) / (top + 1) (sym), limit (1 - 2^-10) (float);
    codes saturate. A `where` on the small scale tensors: other blocks keep today's bits."""
    p = _plain_params(lo, hi, spec)
    if spec.kind == "int" and not spec.symmetric:
        reach = torch.maximum(p.zero, spec.qmax - p.zero) * p.scale  # = max |(q - z) * s|
        k = 1 - 1 / spec.qmax
    elif spec.kind == "int":
        reach, k = -spec.qmin * p.scale, (spec.qmax - spec.qmin) / (spec.qmax - spec.qmin + 2)
    else:
        reach, k = spec.float_max * p.scale, 1 - 2.0**-10
    fits = reach <= limit  # False for inf and NaN
    safe = _plain_params(lo * k, hi * k, spec, halved=True)
    return QParams(torch.where(fits, p.scale, safe.scale),
                   None if p.zero is None else torch.where(fits, p.zero, safe.zero))


def _plain_params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, halved=False) -> QParams:
    """Min/max scales of [lo, hi]; `halved` takes the asym range as (hi/2 - lo/2) * 2: finite
    for any finite lo, hi, but off the normal path, as it may differ in the last bit."""
    if spec.kind == "int" and not spec.symmetric:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # keep 0 exactly representable
        scale = (hi / 2 - lo / 2) / spec.qmax * 2 if halved else (hi - lo) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, spec.qmax)
        return QParams(scale, zero)
    absmax = torch.maximum(lo.abs(), hi.abs())
    top = (spec.qmax - spec.qmin) / 2 if spec.kind == "int" else spec.float_max
    scale = absmax / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return QParams(scale, None)


def _round_int(wb: torch.Tensor, p: QParams, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as floats) of blocked values (one new tensor, the rest in place)."""
    q = torch.div(wb, p.scale).round_()
    if p.zero is not None:
        q.add_(p.zero)
    return q.clamp_(spec.qmin, spec.qmax)


def _round_float(wb: torch.Tensor, p: QParams, spec: QuantSpec) -> torch.Tensor:
    """Values on the ExMy grid (in format units, before the block scale) of blocked values."""
    x = wb / p.scale
    # |x| in [2^(e-1), 2^e) gives e from frexp; binade exponent floor(log2|x|) = e - 1, never
    # below the subnormal exponent 1 - bias. Quantum of that binade: 2^(exp - M).
    _, e = torch.frexp(x)
    exp = (e - 1).clamp(min=1 - spec.bias)
    shift = exp - spec.man_bits
    q = torch.ldexp(torch.round(torch.ldexp(x, -shift)), shift)
    return q.clamp_(-spec.float_max, spec.float_max)


def _on_grid(wb: torch.Tensor, p: QParams, spec: QuantSpec) -> torch.Tensor:
    return _round_int(wb, p, spec) if spec.kind == "int" else _round_float(wb, p, spec)


def _from_grid(q: torch.Tensor, p: QParams) -> torch.Tensor:
    return torch.sub(q, p.zero).mul_(p.scale) if p.zero is not None else q * p.scale


def _round_trip(wb: torch.Tensor, p: QParams, spec: QuantSpec) -> torch.Tensor:
    """_from_grid(_on_grid(wb, p, spec), p): the same operations in the same order, on the one
    new tensor _on_grid makes (the weight-sized temporaries cost more than the arithmetic)."""
    q = _on_grid(wb, p, spec)
    return (q.sub_(p.zero) if p.zero is not None else q).mul_(p.scale)


def compute_qparams(w: torch.Tensor, spec: QuantSpec | str,
                    clip: ClipSearch | None = None) -> QParams:
    """Min/max (or absmax) scales per block of w; with `clip`, the MSE-optimal shrink per block.
    Raises NonFiniteError when w holds NaN or Inf."""
    return _qparams(w, parse_spec(spec), clip, check=True)


def _qparams(w: torch.Tensor, spec: QuantSpec, clip: ClipSearch | None,
             out_dtype: torch.dtype | None = None, check: bool = False) -> QParams:
    """compute_qparams; without `check` no NaN/Inf check, for callers that checked w already
    (GPTQ's group scales). Every w_hat stays finite in `out_dtype` (default w's dtype)."""
    wb = _blocked(w, spec)
    out_dtype = out_dtype or (w.dtype if w.is_floating_point() else spec.compute_dtype)
    limit = min(torch.finfo(spec.compute_dtype).max, torch.finfo(out_dtype).max)
    lo, hi = torch.aminmax(wb, dim=-1, keepdim=True)  # NaN and Inf show in them
    if check and not bool(torch.isfinite(torch.cat([lo, hi])).all()):
        check_finite(w)  # raises, naming the first bad entry
    best = (_params_from_range(lo, hi, spec, limit) if clip is None
            else _clip_search(wb, lo, hi, spec, clip, limit))
    return QParams(best.scale.squeeze(-1), None if best.zero is None else best.zero.squeeze(-1))


_CLIP_CHUNK = 1 << 23  # elements of wb times shrink factors evaluated in one tensor op


def _clip_search(wb: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                 clip: ClipSearch, limit: float) -> QParams:
    """Per block, the shrink factor (1, 1 - max_shrink/grid, ...) with the lowest error; the
    first of equal errors wins, a NaN error never does. Several factors run in one tensor op
    (a leading factor axis, at most _CLIP_CHUNK elements): the same values as one factor at a
    time, element for element, at a fraction of the Python overhead on small groups."""
    shrinks = [1.0 - clip.max_shrink * i / clip.grid for i in range(clip.grid + 1)]
    step = max(1, _CLIP_CHUNK // max(wb.numel(), 1))
    best = best_err = None
    for start in range(0, len(shrinks), step):
        k = torch.tensor(shrinks[start:start + step], dtype=lo.dtype,
                         device=lo.device).view(-1, 1, 1, 1)
        p = _params_from_range(lo * k, hi * k, spec, limit)  # (factors, rows, n_blocks, 1)
        err = _round_trip(wb, p, spec).sub_(wb).abs_().pow_(clip.norm).sum(-1, keepdim=True)
        err = torch.where(err.isnan(), math.inf, err)
        first = err.argmin(dim=0, keepdim=True)  # the first minimum along the factors
        err = err.gather(0, first)[0]
        pick = lambda t: t.gather(0, first)[0]  # noqa: E731
        chunk = QParams(pick(p.scale), None if p.zero is None else pick(p.zero))
        if best is None:  # the first factor, 1, is min/max: an all-NaN block keeps it
            best, best_err = chunk, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(torch.where(better, chunk.scale, best.scale),
                       None if best.zero is None else torch.where(better, chunk.zero, best.zero))
    return best


def _as_blocked_params(p: QParams) -> QParams:
    return QParams(p.scale.unsqueeze(-1), None if p.zero is None else p.zero.unsqueeze(-1))


# --- codes ------------------------------------------------------------------------------------
def _code_dtype(spec: QuantSpec) -> torch.dtype:
    if spec.kind == "int":
        return torch.int8 if spec.symmetric else torch.uint8
    return torch.int16 if spec.bits <= 15 else torch.int32 if spec.bits <= 31 else torch.int64


def _encode_float(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Bit patterns sign|exponent|mantissa of grid values q (exact: q is on the grid)."""
    a = q.abs()
    _, e = torch.frexp(a)
    exp = (e - 1).clamp(min=1 - spec.bias)
    normal = (a >= 2.0 ** (1 - spec.bias)).to(torch.int64)
    field_e = (exp + spec.bias).to(torch.int64) * normal  # 0 for subnormals and zero
    mant = torch.ldexp(a, -(exp - spec.man_bits)).to(torch.int64) - normal * 2**spec.man_bits
    sign = torch.signbit(q).to(torch.int64) & (a > 0).to(torch.int64)  # no negative zero
    code = (sign << (spec.exp_bits + spec.man_bits)) | (field_e << spec.man_bits) | mant
    return code.to(_code_dtype(spec))


def _decode_float(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    c = codes.to(torch.int64)
    mant = c & (2**spec.man_bits - 1)
    field_e = (c >> spec.man_bits) & (2**spec.exp_bits - 1)
    sign = (c >> (spec.exp_bits + spec.man_bits)) & 1
    normal = (field_e > 0).to(torch.int64)
    exp = torch.where(field_e > 0, field_e - spec.bias, torch.full_like(field_e, 1 - spec.bias))
    val = torch.ldexp((mant + normal * 2**spec.man_bits).to(spec.compute_dtype),
                      (exp - spec.man_bits))
    return torch.where(sign.bool(), -val, val)


@dataclass
class QuantizedTensor:
    """Codes on the grid plus the scales that map them back. `codes` has the weight's shape;
    `scale`/`zero` have shape (rows, n_blocks) (see QParams)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    dtype: torch.dtype = torch.float32
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def quantize(
    w: torch.Tensor,
    spec: QuantSpec | str,
    *,
    clip: ClipSearch | None = None,
    qparams: QParams | None = None,
) -> QuantizedTensor:
    """Round w onto the grid of `spec` (round-to-nearest, ties to even). Scales come from
    `qparams` when given, else from each block's range (optionally MSE-clipped). Raises
    NonFiniteError when w holds NaN or Inf."""
    spec = parse_spec(spec)
    if qparams is None:
        p = _qparams(w, spec, clip, check=True)
    else:
        check_finite(w)
        p = qparams
    q = _on_grid(_blocked(w, spec), _as_blocked_params(p), spec).reshape(w.shape)
    codes = q.to(_code_dtype(spec)) if spec.kind == "int" else _encode_float(q, spec)
    zero = None if p.zero is None else p.zero.to(_code_dtype(spec))
    return QuantizedTensor(codes, p.scale.to(spec.compute_dtype), zero, spec, w.dtype)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Map codes back to real values (same shape as the quantized weight, its dtype)."""
    spec = qt.spec
    if spec.kind == "int":
        q = qt.codes.to(spec.compute_dtype)
    else:
        q = _decode_float(qt.codes, spec)
    zero = None if qt.zero is None else qt.zero.to(spec.compute_dtype)
    p = _as_blocked_params(QParams(qt.scale.to(spec.compute_dtype), zero))
    return _from_grid(_blocked(q, spec), p).reshape(qt.codes.shape).to(qt.dtype)


def fake_quantize_with(w: torch.Tensor, qparams: QParams, spec: QuantSpec | str) -> torch.Tensor:
    """Round trip of w with given scales; equals dequantize(quantize(w, spec, qparams=...))."""
    spec = parse_spec(spec)
    p = _as_blocked_params(qparams)
    return _round_trip(_blocked(w, spec), p, spec).reshape(w.shape).to(w.dtype)


def fake_quantize(
    w: torch.Tensor, spec: QuantSpec | str, *, clip: ClipSearch | None = None
) -> torch.Tensor:
    """Round-to-nearest round trip of w: dequantize(quantize(w, spec)) without building codes."""
    spec = parse_spec(spec)
    return fake_quantize_with(w, compute_qparams(w, spec, clip), spec)


def fake_quantize_broadcast(x: torch.Tensor, qparams: QParams, spec: QuantSpec) -> torch.Tensor:
    """Round trip of x with scales that broadcast against it elementwise, e.g. one column
    (out, 1) against its group's scale (out, 1): the per-column step of GPTQ. Same arithmetic
    as `fake_quantize_with`, so the results lie on exactly the same grid. x must be in
    spec.compute_dtype."""
    return _round_trip(x, qparams, spec)


def representable_range(qparams: QParams, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of each block's grid, shape (rows, n_blocks): values outside are clipped."""
    if spec.kind == "int":
        zero = qparams.zero if qparams.zero is not None else 0.0
        return (spec.qmin - zero) * qparams.scale, (spec.qmax - zero) * qparams.scale
    top = spec.float_max * qparams.scale
    return -top, top


def expand_blocks(t: torch.Tensor, shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    """A per-block tensor (rows, n_blocks) broadcast back to the weight's shape."""
    rows, cols = math.prod(shape[:-1]), shape[-1]
    if spec.granularity == "tensor":
        return t.reshape(1, 1).expand(rows, cols).reshape(shape)
    if spec.granularity == "channel":
        return t.reshape(rows, 1).expand(rows, cols).reshape(shape)
    G = spec.group_size
    return t.reshape(rows, cols // G, 1).expand(rows, cols // G, G).reshape(shape)


def sum_blocks(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Sum of x (weight-shaped) over each block: (rows, n_blocks), the adjoint of expand_blocks."""
    return _blocked(x, spec).sum(-1).to(x.dtype)


def inside_range(w: torch.Tensor, qparams: QParams, spec: QuantSpec) -> torch.Tensor:
    """Boolean mask, w's shape: the values within their block's representable range (compared
    through broadcasting, without materializing per-element bounds)."""
    lo, hi = representable_range(_as_blocked_params(qparams), spec)
    wb = _blocked(w, spec)  # a view for float32 weights
    return torch.ge(wb, lo).logical_and_(torch.le(wb, hi)).reshape(w.shape)  # one mask fewer
