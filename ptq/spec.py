"""Quantization spec strings: the grammar, `QuantSpec` and its grid constants, `parse_spec`.

What a spec *means* is defined here once; the arithmetic that rounds onto its grid lives in
`ptq.formats`, which re-exports every name of this module (`from ptq.formats import parse_spec`
keeps working). This module imports nothing of the grid code: the arrow runs formats -> spec.

Spec strings (DESIGN.md): a format followed by a scaling granularity.
  format       int{b}        asymmetric integer grid, b in 2..8: codes 0..2^b-1, a scale and an
                             integer zero point per block, w_hat = (q - z) * s.
               int{b}-sym    symmetric integer grid: codes -2^(b-1)..2^(b-1)-1, zero point 0,
                             s = absmax / ((2^b - 1) / 2)  (all 2^b levels used, as in GPTQ).
               e{E}m{M}      floating point with E exponent and M mantissa bits, subnormals, bias
                             2^(E-1)-1 and no inf/nan codes, so every exponent field is a normal
                             binade: e2m1 = {0, .5, 1, 1.5, 2, 3, 4, 6}; e4m3 max is 480 (not the
                             OCP 448, which keeps a NaN code). s = absmax / format_max.
               fp4 = e2m1, fp8 = e4m3, fp16 = e5m10, bf16 = e8m7 (aliases).
  granularity  -g{G}  one scale per G consecutive input columns of each output row,
               -ch    one scale per output row (the default when omitted),
               -t     one scale for the whole tensor.
A weight is (out_features, in_features); tensors of other ranks are read as (prod(leading), last).
`str(spec)` gives the canonical string back ("int4" -> "int4-ch", "fp4-g32" -> "e2m1-g32").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .errors import QalignError

__all__ = ["EXP_BITS", "FLOAT_ALIASES", "INT_BITS", "MAN_BITS", "QuantSpec", "SpecError",
           "parse_spec"]

FLOAT_ALIASES = {"fp4": (2, 1), "fp8": (4, 3), "fp16": (5, 10), "bf16": (8, 7)}
INT_BITS = range(2, 9)
EXP_BITS = range(1, 9)
MAN_BITS = range(0, 24)

_SPEC_RE = re.compile(
    r"^(?:int(?P<bits>\d+)(?P<sym>-sym)?|e(?P<E>\d+)m(?P<M>\d+)|(?P<alias>fp4|fp8|fp16|bf16))"
    r"(?:-(?:g(?P<group>\d+)|(?P<ch>ch)|(?P<t>t)))?$"
)

_SPEC_HELP = (
    "write int{b}[-sym] (b in 2..8) or e{E}m{M} (E in 1..8, M in 0..23; aliases fp4, fp8, fp16, "
    "bf16), then -g{G}, -ch or -t, e.g. int3-g64, int4-sym-ch, e2m1-g32"
)


class SpecError(QalignError):
    """A quantization spec that is malformed or does not fit the tensor it is applied to."""


@dataclass(frozen=True)
class QuantSpec:
    """A parsed spec string. Build it with `parse_spec`; `str()` gives the canonical string."""

    kind: str  # "int" or "float"
    bits: int  # total bits of one code: b for int, 1 + E + M for float
    symmetric: bool = False
    exp_bits: int = 0
    man_bits: int = 0
    granularity: str = "channel"  # "channel", "group" or "tensor"
    group_size: int = 0

    def __post_init__(self):
        if self.kind == "int":
            if self.bits not in INT_BITS:
                raise SpecError(f"int{self.bits}: integer grids have 2..8 bits; {_SPEC_HELP}")
        elif self.kind == "float":
            if self.exp_bits not in EXP_BITS or self.man_bits not in MAN_BITS:
                raise SpecError(
                    f"e{self.exp_bits}m{self.man_bits}: E must be in 1..8 and M in 0..23; "
                    f"{_SPEC_HELP}"
                )
            if self.bits != 1 + self.exp_bits + self.man_bits:
                raise SpecError(f"float spec bits={self.bits} must equal 1 + E + M")
            if self.symmetric:
                raise SpecError("floating-point grids are symmetric already; drop -sym")
        else:
            raise SpecError(f"kind={self.kind!r} is neither 'int' nor 'float'")
        if self.granularity == "group":
            if self.group_size < 1:
                raise SpecError(f"group size must be a positive integer, got {self.group_size}; "
                                "use e.g. -g64, or -ch for one scale per output channel")
        elif self.granularity in ("channel", "tensor"):
            if self.group_size != 0:
                raise SpecError(f"group_size is only meaningful with -g, not -{self.granularity}")
        else:
            raise SpecError(f"granularity={self.granularity!r}: use 'channel', 'group' or 'tensor'")

    def __str__(self) -> str:
        if self.kind == "int":
            head = f"int{self.bits}" + ("-sym" if self.symmetric else "")
        else:
            head = f"e{self.exp_bits}m{self.man_bits}"
        tail = {"channel": "-ch", "tensor": "-t"}.get(self.granularity, f"-g{self.group_size}")
        return head + tail

    # --- grid constants -------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Smallest integer code (int grids)."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code (int grids)."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def bias(self) -> int:
        """Exponent bias of a float grid."""
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def float_max(self) -> float:
        """Largest finite magnitude of a float grid (all exponent fields are normal binades)."""
        emax = 2**self.exp_bits - 1 - self.bias
        return 2.0**emax * (2.0 - 2.0**-self.man_bits)

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32 unless the float grid's range or smallest subnormal leaves float32."""
        return torch.float64 if self.kind == "float" and self.exp_bits >= 8 else torch.float32

    def per_channel(self) -> "QuantSpec":
        """The same grid with one scale per row (used on one group's columns at a time)."""
        return replace(self, granularity="channel", group_size=0)

    def check_shape(self, in_features: int, where: str = "the tensor") -> None:
        """Raise a SpecError naming `where` when the group size does not divide in_features."""
        if self.granularity != "group" or in_features % self.group_size == 0:
            return
        divisors = [d for d in (32, 64, 96, 128, 192, 256) if in_features % d == 0]
        hint = " or ".join(str(d) for d in divisors[:3]) if divisors else "a divisor of it"
        raise SpecError(
            f"group_size={self.group_size} does not divide in_features={in_features} of {where}; "
            f"use a divisor such as {hint}, or -ch"
        )


def parse_spec(text: str | QuantSpec) -> QuantSpec:
    """Parse a spec string strictly (see module docstring); a QuantSpec passes through."""
    if isinstance(text, QuantSpec):
        return text
    if not isinstance(text, str):
        raise SpecError(f"a quantization spec is a string such as 'int4-g64', got {type(text)}")
    m = _SPEC_RE.match(text.strip().lower())
    if m is None:
        raise SpecError(f"cannot parse quantization spec {text!r}; {_SPEC_HELP}")
    if m["group"] is not None:
        granularity, group = "group", int(m["group"])
    elif m["t"] is not None:
        granularity, group = "tensor", 0
    else:
        granularity, group = "channel", 0
    if m["bits"] is not None:
        return QuantSpec("int", int(m["bits"]), m["sym"] is not None, 0, 0, granularity, group)
    E, M = FLOAT_ALIASES[m["alias"]] if m["alias"] else (int(m["E"]), int(m["M"]))
    if E not in EXP_BITS or M not in MAN_BITS:
        raise SpecError(f"{text!r}: E must be in 1..8 and M in 0..23; {_SPEC_HELP}")
    return QuantSpec("float", 1 + E + M, False, E, M, granularity, group)
