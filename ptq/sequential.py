"""Block-by-block calibration, the driver behind `ptq.quantize_model(..., calib=...)`.

1. The hidden states entering the first decoder block, and the keyword arguments every block
   receives in the model's own forward (attention masks, rotary embeddings: they differ between
   sliding-window and full-attention layers), are captured per batch (`ptq.capture`).
2. For each block in turn, on the compute device: forward hooks on its selected linear layers
   accumulate each layer's Hessian H = 2/n X^T X over all batches (one Hessian for layers that
   read the same input, like q/k/v or gate/up), and keep X itself for methods that ask for it;
   the same pass keeps the FP block's outputs Y. Each layer is quantized by the method (a block
   method gets the whole block, its inputs and Y at once); every result is checked
   (`ptq.validate`) before it is written. The quantized block is run again: its output error
   against Y is the block-level local loss (`BlockRecord`), and its outputs are the next block's
   inputs (propagate="quantized", the default), or Y is (propagate="fp"). With
   `true_sequential`, layers that read the same input form a group, and each later group's
   Hessian is taken with the earlier groups already quantized.
Only the block being quantized (plus its inputs and Y) needs to be on the compute device; the
activations of the budget are held twice (inputs and Y), on disk with `offload_dir`.

Dtypes: the blocks run in the model's own dtype, and the captured activations are kept in it
(bfloat16 halves them); with `offload_dir` they live on disk, one file per batch, and memory holds
one batch at a time. After each block the memory it freed is handed back to the OS
(`ptq.allocator.release_freed_memory`). The statistics do not follow the model's dtype: each
batch's X^T X has float32 products and sums (`ptq.hessian.gram`; bfloat16 inputs on a CPU
take oneDNN's exact bf16 path), summed over batches in float64 (`HessianAccumulator`), and a
method receives W upcast to float32 from a 16-bit model (scales and the GPTQ solve stay
float32/float64); its result is written back rounded to the model's dtype, and the record's
losses are those of the weight the model then holds.
The relative output error of each layer on its calibration inputs, ||X dW^T||^2 / ||X W^T||^2,
is exactly tr(dW H dW^T) / tr(W H W^T), so it comes from H without storing X.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocator import release_freed_memory
from .arch import block_prefix, decoder_blocks
from .capture import DiskActivations, block_output, capture_block_inputs
from .errors import QalignError
from .formats import QuantizedTensor, QuantSpec
from .hessian import HessianAccumulator
from .layers import linear_weight, set_linear_weight
from .metrics import (block_error_sums, layer_loss, ratio, relative_output_error_from_hessian,
                      weight_relative_error)
from .records import BlockRecord, LayerRecord
from .registry import BlockData, LayerStats, Method
from .validate import MethodResultError, check_result

__all__ = ["quantize_blocks"]


# weight dtypes that methods receive upcast to float32 (their rounding would swamp the solve)
_UPCAST = (torch.bfloat16, torch.float16)


def _run_block(block: nn.Module, inputs, kwargs_list: list[dict], out=None) -> None:
    """Run the block on every batch; write output i to out[i] (out may be `inputs` itself: each
    output then replaces its input, which is no longer needed, so a block's inputs and outputs
    are not both held), or drop the outputs when out is None (a statistics-only pass)."""
    for i, kw in enumerate(kwargs_list):
        y = block(inputs[i], **kw)
        if out is not None:
            out[i] = block_output(y)


def _new_store(like, root: Path | None, k: int):
    """An empty store for block k's outputs, of the same kind as `like` (memory or disk)."""
    if isinstance(like, DiskActivations):
        return DiskActivations(root / f"block{k}", like.device)
    return [None] * len(like)


def _input_groups(block: nn.Module, layers: dict[str, nn.Module], inputs, kwargs_list
                  ) -> list[list[str]]:
    """Layers grouped by the input tensor they read, in execution order (one batch)."""
    seen: dict[int, list[str]] = {}
    alive = []  # hold each input so that its id() cannot be reused by a later tensor

    def record(mod, args, out, name):
        alive.append(args[0])
        seen.setdefault(id(args[0]), []).append(name)

    handles = [m.register_forward_hook(
                   lambda mod, args, out, name=name: record(mod, args, out, name))
               for name, m in layers.items()]
    try:
        _run_block(block, [inputs[0]], kwargs_list[:1])
    finally:
        for h in handles:
            h.remove()
    unused = sorted(set(layers) - {n for g in seen.values() for n in g})
    if unused:
        raise QalignError(f"{unused} never ran in the block's forward pass, so they have no "
                          "calibration data; leave them out with filter_fn")
    return list(seen.values())


class _Statistics:
    """Running Hessian (and, for methods that ask, the inputs X) of one input group."""

    def __init__(self, in_features: int, device, keep_inputs: bool):
        self.hessian = HessianAccumulator(in_features, device)
        self.inputs: list[torch.Tensor] | None = [] if keep_inputs else None

    def update(self, x: torch.Tensor) -> None:
        self.hessian.update(x)
        if self.inputs is not None:
            self.inputs.append(x.detach().reshape(-1, x.shape[-1]).float())

    def layer_stats(self) -> LayerStats:
        X = torch.cat(self.inputs) if self.inputs is not None else None
        return LayerStats(H=self.hessian.H, X=X, n_tokens=self.hessian.n_tokens)


def _collect(block: nn.Module, own: dict[str, nn.Module], groups: list[list[str]], inputs,
             kwargs_list: list[dict], out, device, keep_inputs: bool) -> dict[str, _Statistics]:
    """One pass of the block over every batch with hooks on the first layer of each input group
    (layers reading the same input share one Hessian); outputs go to `out` (None: dropped)."""
    stats, handles = {}, []
    for group in groups:
        s = _Statistics(linear_weight(own[group[0]]).shape[1], device, keep_inputs)
        stats.update({n: s for n in group})
        handles.append(own[group[0]].register_forward_hook(
            lambda mod, args, out, s=s: s.update(args[0])))
    try:
        _run_block(block, inputs, kwargs_list, out)
    finally:
        for h in handles:
            h.remove()
    return stats


def _block_error(block: nn.Module, inputs, kwargs_list: list[dict], fp_out, write: bool
                 ) -> tuple[float, int]:
    """Run the quantized block; its relative output error against the FP outputs on the same
    inputs (ptq.metrics.block_error_sums) and the tokens. With `write`, each quantized output
    replaces its input (propagate="quantized")."""
    num = den = 0.0
    tokens = 0
    for i, kw in enumerate(kwargs_list):
        x = inputs[i]
        y = block_output(block(x, **kw))
        e, d = block_error_sums(x, fp_out[i], y)
        num, den, tokens = num + e, den + d, tokens + x.shape[0] * x.shape[1]
        if write:
            inputs[i] = y
    return ratio(num, den), tokens


@torch.no_grad()
def quantize_blocks(model: nn.Module, calib: torch.Tensor, spec: QuantSpec, method: Method,
                    options, layers: dict[str, nn.Module], *, true_sequential: bool = False,
                    propagate: str = "quantized", batch_size: int = 8,
                    device: str | torch.device | None = None, progress: bool = True,
                    on_block: Callable[[int, list[LayerRecord]], None] | None = None,
                    offload_dir: str | Path | None = None
                    ) -> tuple[list[LayerRecord], dict[str, QuantizedTensor], list[BlockRecord]]:
    """Quantize `layers` ({name: module}, already checked against the spec) in place, block by
    block (module docstring); returns the layer records, the codes and one record per block with
    its output error. on_block(k, records): called after block k is quantized and back on the
    model's device, when blocks 0..k hold their quantized weights and the later ones are still
    FP (for trajectories of the global loss along the calibration).
    offload_dir: keep the block inputs on disk, in a temporary folder made inside this one and
    removed when the run ends (also on error), instead of in memory."""
    blocks = decoder_blocks(model)
    prefix = block_prefix(model)
    outside = [n for n in layers if not n.startswith(prefix + ".")]
    if outside:
        raise QalignError(f"{outside[:3]} lie outside the decoder blocks ({prefix}), which the "
                          "block-by-block driver visits; leave them out with filter_fn or use "
                          "a data-free method without calib")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    scratch = nullcontext(None)  # the folder of the offloaded activations (None: memory)
    if offload_dir is not None:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(prefix="qalign-activations-", dir=offload_dir)
    with scratch as root:
        root = None if root is None else Path(root)
        captured = capture_block_inputs(model, calib, batch_size, device,
                                        offload_dir=None if root is None else root / "input")
        inputs = captured.hidden
        records: list[LayerRecord] = []
        block_records: list[BlockRecord] = []
        quantized: dict[str, QuantizedTensor] = {}
        bar = tqdm(range(len(blocks)), desc=f"{method.name} {spec}", disable=not progress)
        for k in bar:
            t0 = time.perf_counter()
            kwargs_list = captured.kwargs(k)
            block = blocks[k].to(device)
            own = {n: mod for n, mod in layers.items() if n.startswith(f"{prefix}.{k}.")}
            groups = _input_groups(block, own, inputs, kwargs_list) if own else []
            fp_out = _new_store(inputs, root, k)  # the FP block's outputs: targets and next inputs
            if method.kind == "block":
                stats = _collect(block, own, groups, inputs, kwargs_list, fp_out, device, False)
                if own:
                    data = BlockData(k, f"{prefix}.{k}", own, inputs, kwargs_list, fp_out,
                                     {n: stats[n].layer_stats() for n in own})
                    records += _quantize_block(block, data, spec, method, options, quantized)
                del stats
            else:
                # one calibration pass for the whole block, or one per input group
                stages = [[g] for g in groups] if true_sequential else [groups]
                for si, stage in enumerate(stages):
                    stats = _collect(block, own, stage, inputs, kwargs_list,
                                     fp_out if si == 0 else None, device, method.needs_inputs)
                    for n in (n for group in stage for n in group):
                        records.append(_quantize_layer(n, k, own[n], stats[n], spec, method,
                                                       options, quantized))
                    del stats
            if own:
                err, tokens = _block_error(block, inputs, kwargs_list, fp_out,
                                           write=propagate == "quantized")
                block_records.append(BlockRecord(k, err, tokens, time.perf_counter() - t0))
            if propagate == "quantized" and own:
                if isinstance(fp_out, DiskActivations):
                    fp_out.remove()
            else:  # the FP outputs feed the next block (unchanged when it has no layer)
                if isinstance(inputs, DiskActivations):
                    inputs.remove()  # block k's inputs are spent
                inputs = fp_out
            del fp_out
            if device != home:
                blocks[k].to(home)
            release_freed_memory()
            if on_block is not None:
                on_block(k, records)
            worst = max((r.rel_output_error for r in records if r.block == k), default=0.0)
            bar.set_postfix(block=k, max_rel_err=f"{worst:.3g}")
        return records, quantized, block_records


def _upcast(W_model: torch.Tensor) -> torch.Tensor:
    return W_model.float() if W_model.dtype in _UPCAST else W_model


def _quantize_layer(name: str, k: int, module: nn.Module, stats: _Statistics, spec: QuantSpec,
                    method: Method, options, quantized: dict) -> LayerRecord:
    """Quantize one layer in place from its statistics; its record."""
    t0 = time.perf_counter()
    W_model = linear_weight(module).detach()
    layer_stats = stats.layer_stats()
    res = method.fn(_upcast(W_model), layer_stats, spec, options)
    return _commit(name, k, module, W_model, layer_stats, res, spec, method, quantized,
                   time.perf_counter() - t0)


def _quantize_block(block: nn.Module, data: BlockData, spec: QuantSpec, method: Method, options,
                    quantized: dict) -> list[LayerRecord]:
    """Run a block method on one block; check what it returned and what it left behind, then
    write its weights. The records share the method's time equally among the layers."""
    t0 = time.perf_counter()
    fp_weights = {n: linear_weight(m).detach().clone() for n, m in data.layers.items()}
    own = {linear_weight(m).data_ptr() for m in data.layers.values()}
    others = {n: p.detach().clone() for n, p in block.named_parameters() if p.data_ptr() not in own}
    results = method.fn(block, data, spec, options)
    where = f"block method {method.name!r} on block {data.index}"
    if not isinstance(results, dict) or set(results) != set(data.layers):
        got = sorted(results) if isinstance(results, dict) else type(results).__name__
        raise MethodResultError(f"{where} returned {got}; return {{name: QuantResult}} for "
                                f"exactly the block's layers {sorted(data.layers)}")
    for n, m in data.layers.items():
        if block.get_submodule(data.relative(n)) is not m:
            raise MethodResultError(f"{where} left {n} swapped for another module; put the "
                                    "original layers back before returning")
    params = dict(block.named_parameters())
    changed = [n for n, v in others.items() if n not in params or not torch.equal(params[n], v)]
    if changed:
        raise MethodResultError(f"{where} changed {changed[:3]}, which are not the weights of "
                                "its layers; a block method may change only those")
    share = (time.perf_counter() - t0) / len(data.layers)
    return [_commit(n, data.index, m, fp_weights[n], data.stats[n], results[n], spec, method,
                    quantized, share) for n, m in data.layers.items()]


def _commit(name: str, k: int, module: nn.Module, W_model: torch.Tensor, layer_stats: LayerStats,
            res, spec: QuantSpec, method: Method, quantized: dict, seconds: float
            ) -> LayerRecord:
    """Check a method's result for one layer (ptq.validate), write it and record it. A 16-bit
    weight went to the method as float32 and comes back rounded to the model's dtype (module
    docstring)."""
    W = _upcast(W_model)
    qt = check_result(method.name, name, W, res, spec)
    Wq, loss = res.weight, res.loss
    if W is not W_model:
        # what the model will hold; its codes dequantize to exactly that weight
        Wq = res.weight.to(W_model.dtype).float()
        qt = replace(qt, dtype=W_model.dtype)
        loss = None
    H = layer_stats.H
    loss = loss if loss is not None else layer_loss(W, Wq, H)
    rel = relative_output_error_from_hessian(W, Wq, H, loss)
    err = weight_relative_error(W, Wq)
    set_linear_weight(module, Wq)
    quantized[name] = qt
    return LayerRecord(name, k, tuple(W.shape), method.name, str(spec), err, loss, rel,
                       getattr(res, "damp", None), layer_stats.n_tokens, seconds)
