"""Block-by-block calibration: quantize a decoder model with any registered method.

1. Run the model's embeddings on the calibration blocks, with the model truncated to its first
   decoder block; a forward pre-hook on that block records its inputs and keyword arguments
   (attention mask, position embeddings) per batch. No exceptions, no monkeypatching.
2. For each block in turn, on the compute device: forward hooks on its selected linear layers
   accumulate each layer's Hessian H = 2/n X^T X over all batches (one Hessian for layers that
   read the same input, like q/k/v or gate/up); each layer is quantized by
   the method; the block is run again to produce the next block's inputs (from the quantized
   block by default, or from the FP block with propagate="fp", which needs no second pass).
   With `true_sequential`, layers that read the same input (q/k/v, gate/up) form a group, and
   each later group's Hessian is taken with the earlier groups already quantized.
Only the block being quantized (plus its inputs) needs to be on the compute device.
The relative output error of each layer on its calibration inputs, ||X dW^T||^2 / ||X W^T||^2,
is exactly tr(dW H dW^T) / tr(W H W^T), so it comes from H without storing X.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .apply import FilterFn, linear_weight, quantizable_linears, set_linear_weight
from .arch import decoder_blocks, get_arch
from .formats import QuantizedTensor, QuantSpec, parse_spec
from .metrics import layer_loss, relative_output_error_from_hessian
from .hessian import HessianAccumulator
from .registry import LayerStats, get_method

__all__ = ["LayerRow", "SequentialResult", "quantize_sequential", "capture_block_inputs"]


@dataclass
class LayerRow:
    name: str
    block: int
    shape: tuple[int, int]
    method: str
    spec: str
    damp: float | None  # damping the method used, if it has one
    proxy_loss: float  # tr(dW H dW^T) on this layer's calibration inputs
    rel_output_error: float  # ||X dW^T||^2 / ||X W^T||^2 on the same inputs
    n_tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SequentialResult:
    rows: list[LayerRow]
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    seconds: float = 0.0


@contextmanager
def _first_block_only(model: nn.Module):
    """The model's base (embeddings + blocks + final norm) truncated to its first block."""
    path = get_arch(model).blocks
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([blocks[0]]))
    try:
        yield parent
    finally:
        setattr(parent, attr, blocks)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int,
                         device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering the first decoder block, and its keyword arguments, per batch."""
    inputs, kwargs_list = [], []

    def record(module, args, kwargs):
        inputs.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs = {k: v for k, v in kwargs.items()
                  if k not in ("hidden_states", "past_key_values", "past_key_value",
                               "layer_past", "use_cache")}
        kwargs_list.append(kwargs)

    blocks = decoder_blocks(model)
    with _first_block_only(model) as base:
        home = next(base.parameters()).device
        base.to(device)
        handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            for batch in calib.split(batch_size):
                base(input_ids=batch.to(device), use_cache=False)
        finally:
            handle.remove()
            base.to(home)
    return inputs, kwargs_list


def _run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs_list: list[dict],
               in_place: bool = False) -> list[torch.Tensor]:
    """The block's outputs per batch; in_place writes each over its input (which is then no
    longer needed), so a block's inputs and outputs are not both held."""
    outs = inputs if in_place else [None] * len(inputs)
    for i, kw in enumerate(kwargs_list):
        out = block(inputs[i], **kw)
        outs[i] = out[0] if isinstance(out, tuple) else out
    return outs


def _input_groups(block: nn.Module, layers: dict[str, nn.Module], inputs, kwargs_list
                  ) -> list[list[str]]:
    """Layers grouped by the input tensor they read, in execution order (one batch)."""
    seen: dict[int, list[str]] = {}
    alive = []  # hold each input so that its id() cannot be reused by a later tensor

    def record(mod, args, out, name):
        alive.append(args[0])
        seen.setdefault(id(args[0]), []).append(name)

    handles = [m.register_forward_hook(lambda mod, args, out, name=name: record(mod, args, out, name))
               for name, m in layers.items()]
    try:
        _run_block(block, inputs[:1], kwargs_list[:1])
    finally:
        for h in handles:
            h.remove()
    unused = sorted(set(layers) - {n for g in seen.values() for n in g})
    if unused:
        raise ValueError(f"{unused} never ran in the block's forward pass, so they have no "
                         "calibration data; leave them out with filter_fn")
    return list(seen.values())


@torch.no_grad()
def quantize_sequential(model: nn.Module, calib: torch.Tensor, spec: QuantSpec | str,
                        method: str = "gptq", options=None, *, filter_fn: FilterFn | None = None,
                        true_sequential: bool = False, propagate: str = "quantized",
                        batch_size: int = 8, device: str | torch.device | None = None,
                        progress: bool = True,
                        on_block: Callable[[int, list[LayerRow]], None] | None = None
                        ) -> SequentialResult:
    """Quantize the selected linear layers of `model` in place, block by block (module doc).

    calib: (n_samples, seq_len) token ids, e.g. from `DataBudget.blocks`.
    on_block(k, rows): called after block k is quantized and back on the model's device, when
    blocks 0..k hold their quantized weights and the later ones are still FP (for trajectories of
    the global loss along the calibration); rows are all layer rows so far.
    """
    t_start = time.perf_counter()
    spec = parse_spec(spec)
    m = get_method(method)
    options = options if options is not None else m.options()
    if propagate not in ("quantized", "fp"):
        raise ValueError(f"propagate={propagate!r}: use 'quantized' or 'fp'")
    if m.needs_inputs:
        raise NotImplementedError(f"method {method!r} asks for raw inputs X; the driver passes "
                                  "the Hessian only for now")
    blocks = decoder_blocks(model)
    prefix = get_arch(model).blocks
    selected = dict(quantizable_linears(model, filter_fn))
    for name, module in selected.items():
        spec.check_shape(linear_weight(module).shape[1], name)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home

    inputs, kwargs_list = capture_block_inputs(model, calib, batch_size, device)
    rows: list[LayerRow] = []
    quantized: dict[str, QuantizedTensor] = {}
    bar = tqdm(range(len(blocks)), desc=f"{method} {spec}", disable=not progress)
    for k in bar:
        block = blocks[k].to(device)
        layers = {n: mod for n, mod in selected.items() if n.startswith(f"{prefix}.{k}.")}
        groups = _input_groups(block, layers, inputs, kwargs_list) if layers else []
        # one calibration pass for the whole block, or one per input group (true-sequential)
        stages = [[g] for g in groups] if true_sequential else [groups]
        outputs = None
        for si, stage in enumerate(stages):
            acc, handles = {}, []
            for group in stage:  # layers reading the same input share one Hessian
                a = HessianAccumulator(linear_weight(layers[group[0]]).shape[1], device)
                acc.update({n: a for n in group})
                handles.append(layers[group[0]].register_forward_hook(
                    lambda mod, args, out, a=a: a.update(args[0])))
            try:
                outs = _run_block(block, inputs, kwargs_list)
            finally:
                for h in handles:
                    h.remove()
            if si == 0 and propagate == "fp":
                outputs = outs  # the FP block's outputs feed the next block
            for n in (n for group in stage for n in group):
                t0 = time.perf_counter()
                W = linear_weight(layers[n]).detach()
                H = acc[n].H
                res = m.fn(W, LayerStats(H=H, n_tokens=acc[n].n_tokens), spec, options)
                loss = res.loss if res.loss is not None else layer_loss(W, res.weight, H)
                rel = relative_output_error_from_hessian(W, res.weight, H, loss)
                set_linear_weight(layers[n], res.weight)
                if res.quantized is not None:
                    quantized[n] = res.quantized
                rows.append(LayerRow(n, k, tuple(W.shape), method, str(spec),
                                     getattr(res, "damp", None), loss, rel, acc[n].n_tokens,
                                     time.perf_counter() - t0))
            del acc
        if outputs is None:
            outputs = _run_block(block, inputs, kwargs_list, in_place=True)
        inputs = outputs
        if device != home:
            blocks[k].to(home)
        if on_block is not None:
            on_block(k, rows)
        worst = max((r.rel_output_error for r in rows if r.block == k), default=0.0)
        bar.set_postfix(block=k, max_rel_err=f"{worst:.3g}")
    return SequentialResult(rows, quantized, time.perf_counter() - t_start)
