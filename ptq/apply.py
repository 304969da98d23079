"""Quantize a model with any registered method: the one PTQ entry point.

    result = ptq.quantize_model(model, "int3-g64", method="gptq", calib=blocks)

Methods that calibrate (a Hessian H = 2/n X^T X per layer, or the inputs X themselves) run block
by block on `calib` (`ptq.sequential`); methods that need no data (RTN) visit the layers directly,
unless `calib` is given, in which case they go through the same driver so that their per-layer
record also holds the output error on the calibration inputs. Every path returns one
`PTQResult` with one `LayerRecord` per layer (the dataclasses live in `ptq.records`, below
both this module and the driver, and are re-exported here). Every layer's shape is checked
against the spec before any weight changes.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocator import release_freed_memory
from .errors import QalignError
from .formats import QuantSpec, parse_spec
from .layers import FilterFn, linear_weight, select_linears, set_linear_weight
from .metrics import weight_relative_error
from .records import BlockRecord, LayerRecord, PTQResult
from .registry import get_method
from .sequential import quantize_blocks
from .validate import check_result

__all__ = ["BlockRecord", "LayerRecord", "PTQResult", "quantize_model"]


def _block_index(name: str, model: nn.Module) -> int | None:
    from .arch import block_prefix

    prefix = block_prefix(model) + "."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def quantize_model(model: nn.Module, spec: QuantSpec | str, method: str = "rtn", options=None,
                   *, calib: torch.Tensor | None = None, filter_fn: FilterFn | None = None,
                   true_sequential: bool = False, propagate: str = "quantized",
                   batch_size: int = 8, device: str | torch.device | None = None,
                   progress: bool = True,
                   on_block: Callable[[int, list[LayerRecord]], None] | None = None,
                   offload_dir: str | Path | None = None) -> PTQResult:
    """Quantize the selected linear layers of `model` in place with the method `method`.

    options: the method's options dataclass, a dict of its fields, or None for its defaults.
    calib: (n_samples, seq_len) token ids (e.g. `DataBudget.blocks`); required by methods that
        calibrate. true_sequential, propagate, batch_size, device, on_block and offload_dir
        (keep the calibration activations on disk there) shape the block-by-block run
        (`ptq.sequential.quantize_blocks`) and are refused without calib.
    filter_fn(module, name): which linear layers (default: every one in the decoder blocks).
    """
    t0 = time.perf_counter()
    spec = parse_spec(spec)
    m = get_method(method)
    options = m.resolve_options(options)
    if propagate not in ("quantized", "fp"):
        raise QalignError(f"propagate={propagate!r}: use 'quantized' or 'fp'")
    if batch_size < 1:
        raise QalignError(f"batch_size={batch_size} must be >= 1")
    layers = select_linears(model, filter_fn)
    for name, module in layers:
        spec.check_shape(linear_weight(module).shape[1], name)
    if calib is None and m.needs_data:
        raise QalignError(f"method {method!r} calibrates on data: pass calib=(n_samples, "
                          "seq_len) token ids, e.g. DataBudget(128, 512).blocks(tokens)")
    if calib is None and (true_sequential or propagate != "quantized" or on_block is not None
                          or device is not None or offload_dir is not None):
        raise QalignError("true_sequential, propagate, device, on_block and offload_dir shape a "
                          f"calibrated run; method {method!r} got no calib, so they would be "
                          "ignored")
    if true_sequential and m.kind == "block":
        raise QalignError(f"true_sequential orders the layers inside a block; the block method "
                          f"{method!r} quantizes each block at once: leave it off")
    if calib is not None:
        _check_calib(model, calib)

        records, quantized, blocks = quantize_blocks(
            model, calib, spec, m, options, dict(layers), true_sequential=true_sequential,
            propagate=propagate, batch_size=batch_size, device=device, progress=progress,
            on_block=on_block, offload_dir=offload_dir)
        release_freed_memory()  # the captured activations and the last block's leftovers
        tokens = int(calib.numel())
    else:
        records, quantized = _quantize_layers(model, spec, m, options, layers, progress)
        tokens, blocks = 0, []
    return PTQResult(method, str(spec), asdict(options), records, quantized, tokens,
                     time.perf_counter() - t0, blocks)


def _check_calib(model: nn.Module, calib) -> None:
    """Token ids (n_samples, seq_len), integers within the vocabulary: anything else would fail
    deep inside the first forward pass, or silently calibrate on garbage."""
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0:
        shape = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise QalignError(f"calib is {shape}: give (n_samples, seq_len) token ids, e.g. "
                          "DataBudget(128, 512).blocks(tokens)")
    if calib.dtype not in (torch.int64, torch.int32):
        raise QalignError(f"calib holds {calib.dtype} values: give integer token ids "
                          "(torch.long), not embeddings or floats")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    lo, hi = int(calib.min()), int(calib.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise QalignError(f"calib holds token ids {lo}..{hi} but the model's vocabulary has "
                          f"{vocab}; tokenize with the model's own tokenizer")


@torch.no_grad()
def _quantize_layers(model, spec, m, options, layers, progress):
    """A data-free method, layer by layer, no forward pass."""
    records, quantized = [], {}
    for name, module in tqdm(layers, desc=f"{m.name} {spec}", disable=not progress, leave=False):
        t0 = time.perf_counter()
        W = linear_weight(module)
        res = m.fn(W, None, spec, options)
        quantized[name] = check_result(m.name, name, W, res, spec)
        err = weight_relative_error(W, res.weight)
        set_linear_weight(module, res.weight)
        records.append(LayerRecord(name, _block_index(name, model), tuple(W.shape), m.name,
                                   str(spec), err, damp=getattr(res, "damp", None),
                                   seconds=time.perf_counter() - t0))
    return records, quantized
