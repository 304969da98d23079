"""Layer-wise PTQ methods, found by name in one plain dict filled by a decorator.

A method is a function `fn(W, stats, spec, options) -> QuantResult`:
  W        the layer weight, (out_features, in_features), any float dtype;
  stats    `LayerStats` with the Hessian H = 2/n X^T X (in, in) and, when the method asks for
           them, the calibration inputs X (n, in); None for methods that need no data (RTN);
  spec     a `QuantSpec`;
  options  an instance of the method's options dataclass.
It returns the quantized weight on the spec's grid. Built-in methods (rtn, gptq) register exactly
like a user's:

    @register_method("mine", options=MyOptions, needs_hessian=True)
    def my_method(W, stats, spec, options): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import OptionsError, QalignError
from .formats import QuantizedTensor, QuantSpec

__all__ = ["LayerStats", "QuantResult", "Method", "METHODS", "UnknownMethodError", "register_method",
           "get_method"]


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer. H: (in, in) float32 or float64; X: (n, in)."""

    H: torch.Tensor | None = None
    X: torch.Tensor | None = None
    n_tokens: int = 0


@dataclass
class QuantResult:
    """What a method returns. `weight` is dequantized (W's shape and dtype); `quantized` holds
    codes and scales when the method has them; `loss` is the method's own proxy loss."""

    weight: torch.Tensor
    quantized: QuantizedTensor | None = None
    loss: float | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[torch.Tensor, LayerStats | None, QuantSpec, object], QuantResult]
    options: type
    needs_hessian: bool = False
    needs_inputs: bool = False
    search_space: dict = field(default_factory=dict)  # {option field: values to tune over}

    @property
    def needs_data(self) -> bool:
        """Whether the method calibrates (and so runs block by block on calibration data)."""
        return self.needs_hessian or self.needs_inputs

    def make_options(self, **kwargs):
        """Options from keyword arguments; unknown keys are an error naming the known ones."""
        known = set(getattr(self.options, "__dataclass_fields__", {}))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OptionsError(
                f"unknown option(s) {unknown} for method {self.name!r}; known: {sorted(known)}"
            )
        return self.options(**kwargs)

    def resolve_options(self, options=None):
        """The method's options from None (its defaults), a dict of fields, or an instance."""
        if options is None:
            return self.options()
        if isinstance(options, dict):
            return self.make_options(**options)
        if not isinstance(options, self.options):
            raise OptionsError(f"method {self.name!r} takes {self.options.__name__}, not "
                               f"{type(options).__name__}")
        return options


METHODS: dict[str, Method] = {}


class UnknownMethodError(QalignError, KeyError):
    """A method name that nothing registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_method(name: str, *, options: type, needs_hessian: bool = False,
                    needs_inputs: bool = False, search_space: dict | None = None):
    """Decorator that registers `fn` under `name`; registering a taken name is an error.
    `search_space` {option field: (values, ...)} is what matched tuning may try (recipes draw
    the same number of trials for every method from these spaces)."""

    def wrap(fn):
        if name in METHODS:
            raise QalignError(f"a PTQ method named {name!r} is already registered")
        space = {k: tuple(v) for k, v in (search_space or {}).items()}
        fields = set(getattr(options, "__dataclass_fields__", {}))
        unknown = sorted(set(space) - fields)
        if unknown or any(not v for v in space.values()):
            raise OptionsError(f"search space of {name!r}: {unknown or 'an empty value list'}; "
                               f"give non-empty value tuples for fields of {options.__name__}")
        METHODS[name] = Method(name, fn, options, needs_hessian, needs_inputs, space)
        return fn

    return wrap


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown PTQ method {name!r}; registered: {sorted(METHODS)}. "
            "Register your own with @ptq.register_method(name, options=YourOptions)."
        ) from None
