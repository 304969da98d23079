"""Block-wise reconstruction with the straight-through estimator: a block method between
layer-local GPTQ and whole-model QAFT.

Each decoder block's selected linear layers are fake-quantized (`FakeQuantLinear`, learned
scales), and their latent weights and scales are trained with Adam to minimize the block's output
MSE against the FP block on the calibration budget, ||block_q(X) - block(X)||^2, one block at a
time, on the inputs the driver gives it (the quantized previous blocks' outputs by default). This
is Block-AP of EfficientQAT (Chen et al. 2024, arXiv 2407.11062, section 3.2: "block-wise
training of all parameters"), the weight-and-scale form of BRECQ's block reconstruction (Li et al.
2021, arXiv 2102.05426), written only against the public block-method interface
(`ptq.register_block_method`); it registers under "block-ap".

The block is trained on a float32 copy (the model's own block is not touched; the driver writes
the returned weights), computing in the model's dtype under autocast when that is 16-bit (the
weights, scales, Adam and the loss stay float32), in steps of `batch_size` calibration samples
(2, as EfficientQAT; the same tokens in four times the updates of the driver's batches of 8),
batches in a seeded order, starting from the layers' GPTQ solutions
on the same Hessians (`init="gptq"`, the default: the block objective then refines what the layer
objective reached, which is the step of the locality ladder this toolkit measures), or from RTN
or MSE-clipped RTN as in EfficientQAT (`init="rtn"`, `"mse"`). A start on the grid gives the
learned scales no gradient (the LSQ gradient of a weight on its grid point is 0) until the latent
weights move; the weights' Adam steps of lr move them. The main job's report measures Block-AP
against GPTQ (README, main job).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq import BlockData, QuantResult, QuantSpec, get_method, register_block_method
from ptq.capture import block_output
from ptq.errors import OptionsError
from ptq.layers import linear_weight

from .fake_quant import FakeQuantLinear, _swap
from .train_parts import fused_adam

__all__ = ["BlockAPOptions", "BLOCK_AP_SEARCH_SPACE", "block_ap", "slice_batch"]

INITS = ("rtn", "mse", "gptq")


@dataclass(frozen=True)
class BlockAPOptions:
    epochs: int = field(default=8, metadata={"help": "passes over the calibration budget"})
    batch_size: int = field(default=2, metadata={
        "help": "calibration samples per optimizer step (each of the driver's batches is split)"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the latent weights"})
    scale_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the scales"})
    init: str = field(default="gptq", metadata={
        "help": "start from rtn, mse or gptq (the GPTQ solution on the same Hessians)"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order"})

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise OptionsError(f"block-ap epochs={self.epochs!r}: give an integer >= 0")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or \
                self.batch_size < 1:
            raise OptionsError(f"block-ap batch_size={self.batch_size!r}: give an integer >= 1")
        if not (self.lr >= 0 and self.scale_lr >= 0):
            raise OptionsError(f"block-ap lr={self.lr}, scale_lr={self.scale_lr}: give rates "
                               ">= 0 (e.g. 1e-4)")
        if self.init not in INITS:
            raise OptionsError(f"block-ap init={self.init!r}: use one of {', '.join(INITS)}")


BLOCK_AP_SEARCH_SPACE = {"lr": (1e-4, 3e-4), "scale_lr": (1e-4, 1e-5), "init": ("gptq", "rtn")}


def _float32(obj):
    """Floating tensors (also inside tuples, lists, dicts) as float32: the block's keyword
    arguments (rotary embeddings, masks) in the dtype of the float32 copy."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    return obj


def slice_batch(obj, start: int, stop: int, batch: int):
    """Samples start:stop of a block's keyword arguments for a batch of `batch` samples: tensors
    of two or more dimensions whose first is the batch (masks, rotary embeddings, position ids)
    are sliced; 1-d ones (cache positions) and broadcast ones (first dimension 1) are kept."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() >= 2 and obj.shape[0] == batch > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_batch(o, start, stop, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: slice_batch(v, start, stop, batch) for k, v in obj.items()}
    return obj


@register_block_method("block-ap", options=BlockAPOptions, search_space=BLOCK_AP_SEARCH_SPACE)
def block_ap(block: nn.Module, data: BlockData, spec: QuantSpec,
             options: BlockAPOptions = BlockAPOptions()) -> dict[str, QuantResult]:
    """Train the block's fake-quantized weights and scales on its output MSE (module docstring)."""
    gptq = get_method("gptq")
    work = copy.deepcopy(block).float()
    work.requires_grad_(False)
    layers: dict[str, FakeQuantLinear] = {}
    for name in data.layers:
        rel = data.relative(name)
        linear = work.get_submodule(rel)
        init = options.init
        if init == "gptq":  # GPTQ with its own defaults, as the method "gptq" runs it
            init = gptq.fn(linear_weight(linear).detach(), data.stats[name], spec,
                           gptq.options()).quantized
        fq = FakeQuantLinear(linear, spec, scale_mode="learned", init=init)
        _swap(work, rel, fq)
        fq.weight.requires_grad_(True)
        layers[name] = fq
    groups = [{"params": [fq.weight for fq in layers.values()], "lr": options.lr},
              {"params": [fq.scale for fq in layers.values()], "lr": options.scale_lr}]
    opt = torch.optim.Adam(groups, fused=fused_adam(p for g in groups for p in g["params"]))
    order = torch.Generator().manual_seed(options.seed)
    n = len(data.kwargs)
    kwargs = [_float32(kw) for kw in data.kwargs]
    # a 16-bit model's block computes in its own dtype (autocast); weights, scales, Adam and
    # the loss stay float32
    low = data.inputs[0].dtype if data.inputs[0].dtype in (torch.bfloat16, torch.float16) else None
    device = data.inputs[0].device.type
    with torch.enable_grad():
        for _ in range(options.epochs):
            for i in torch.randperm(n, generator=order).tolist():
                x, y = data.inputs[i].float(), data.targets[i].float()
                b = x.shape[0]
                for s in range(0, b, options.batch_size):
                    e = min(s + options.batch_size, b)
                    with torch.autocast(device, dtype=low or torch.float32,
                                        enabled=low is not None):
                        out = block_output(work(x[s:e], **slice_batch(kwargs[i], s, e, b)))
                    loss = nn.functional.mse_loss(out.float(), y[s:e])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    for fq in layers.values():  # a scale at 0 would put the whole block at 0
                        fq.scale.data.clamp_(min=torch.finfo(torch.float32).tiny)
    results = {}
    for name, fq in layers.items():
        qt = fq.quantize()
        results[name] = QuantResult(qt.dequantize(), qt)
    return results
