"""Apply a layer-wise method to the linear layers of a model, one tree walker for all.

`quantizable_linears` yields the layers a method touches: by default every linear layer inside
the decoder blocks (embeddings and lm_head stay in full precision); a `filter_fn(module, name)`
replaces that default. GPT-2's `Conv1D` stores its weight transposed, (in, out); `linear_weight`
and `set_linear_weight` hide that, so methods always see (out_features, in_features).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import block_prefix
from .formats import QuantizedTensor, QuantSpec, parse_spec
from .registry import get_method

__all__ = ["FilterFn", "is_linear", "linear_weight", "set_linear_weight", "in_decoder_blocks",
           "quantizable_linears", "LayerReport", "QuantizedModel", "quantize_model"]

FilterFn = Callable[[nn.Module, str], bool]


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), which is a linear layer stored transposed."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a view, no copy."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@torch.no_grad()
def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out, in) weight back in place (keeps the Parameter, so tied views stay tied)."""
    target = module.weight if isinstance(module, nn.Linear) else module.weight.t()
    target.copy_(weight.to(target.dtype))


def in_decoder_blocks(model: nn.Module) -> FilterFn:
    """The default filter: linear layers whose name lies under the model's decoder blocks."""
    prefix = block_prefix(model) + "."
    return lambda module, name: name.startswith(prefix)


def quantizable_linears(model: nn.Module, filter_fn: FilterFn | None = None
                        ) -> Iterator[tuple[str, nn.Module]]:
    keep = filter_fn if filter_fn is not None else in_decoder_blocks(model)
    for name, module in model.named_modules():
        if is_linear(module) and keep(module, name):
            yield name, module


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    weight_rel_error: float  # ||W - Wq||_F^2 / ||W||_F^2
    seconds: float


@dataclass
class QuantizedModel:
    layers: list[LayerReport]
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec | str, method: str = "rtn",
                   options=None, filter_fn: FilterFn | None = None,
                   progress: bool = True, keep_codes: bool = False) -> QuantizedModel:
    """Quantize the selected layers in place with a method that needs no calibration data.

    Methods that need a Hessian or inputs (gptq) go through the block-by-block driver instead.
    Every layer's shape is checked against the spec before any weight changes. Returns the
    per-layer reports and, with keep_codes, {name: QuantizedTensor} for saving.
    """
    spec = parse_spec(spec)
    m = get_method(method)
    if m.needs_hessian or m.needs_inputs:
        raise ValueError(f"method {method!r} needs calibration data; use the sequential driver")
    options = options if options is not None else m.options()
    layers = list(quantizable_linears(model, filter_fn))
    if not layers:
        raise ValueError("no linear layer matched; check filter_fn or the model's architecture")
    for name, module in layers:
        spec.check_shape(linear_weight(module).shape[1], name)
    reports, codes = [], {}
    for name, module in tqdm(layers, desc=f"{method} {spec}", disable=not progress, leave=False):
        t0 = time.perf_counter()
        W = linear_weight(module)
        res = m.fn(W, None, spec, options)
        Wq = res.weight
        if keep_codes and res.quantized is not None:
            codes[name] = res.quantized
        err = float((W.float() - Wq.float()).pow(2).sum() / W.float().pow(2).sum().clamp_min(1e-30))
        set_linear_weight(module, Wq)
        reports.append(LayerReport(name, tuple(W.shape), err, time.perf_counter() - t0))
    return QuantizedModel(reports, codes)
