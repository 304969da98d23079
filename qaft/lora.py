"""QLoRA-style fine-tuning: LoRA adapters (peft) on a frozen base whose weights are on the grid.

The base layers are snapped onto the spec's grid once (RTN, or a PTQ solution such as GPTQ's)
and frozen; only the low-rank adapters B A train, in full precision. Forward: W_q x + s B A x.
`merge_and_requantize` folds the adapters in, W_q + s B A, which is off the grid, and rounds the
merged weight back onto it (RTN, fresh scales): the deployable model is that re-quantized one,
and results must say so (`MERGED_NOTE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ptq.apply import FilterFn, in_decoder_blocks, set_linear_weight
from ptq.formats import QuantizedTensor, QuantSpec, dequantize, parse_spec, quantize

__all__ = ["LoraOptions", "prepare_lora", "merge_and_requantize", "MERGED_NOTE"]

MERGED_NOTE = ("LoRA merged into the quantized base, then re-quantized with RTN: evaluated after "
               "re-quantization, not before")


@dataclass(frozen=True)
class LoraOptions:
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank} must be >= 1")


def prepare_lora(model: nn.Module, spec: QuantSpec | str, options: LoraOptions = LoraOptions(),
                 filter_fn: FilterFn | None = None,
                 init: dict[str, QuantizedTensor] | None = None):
    """Snap the selected Linear layers onto the grid (RTN, or `init`), freeze everything, add
    LoRA adapters to those layers. Returns the peft model (train it with `finetune`)."""
    from peft import LoraConfig, get_peft_model

    spec = parse_spec(spec)
    keep = filter_fn if filter_fn is not None else in_decoder_blocks(model)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and keep(m, n)]
    if not names:
        raise ValueError("no nn.Linear matched; check filter_fn")
    for name in names:
        module = model.get_submodule(name)
        spec.check_shape(module.in_features, name)
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            qt = init[name] if init is not None else quantize(module.weight, spec)
            set_linear_weight(module, dequantize(qt))
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=names, bias="none")
    return get_peft_model(model, config)


@torch.no_grad()
def merge_and_requantize(peft_model, spec: QuantSpec | str, filter_fn: FilterFn | None = None
                         ) -> tuple[nn.Module, dict[str, QuantizedTensor]]:
    """Merge the adapters, re-quantize the merged layers with RTN; (model, codes)."""
    spec = parse_spec(spec)
    model = peft_model.merge_and_unload()
    keep = filter_fn if filter_fn is not None else in_decoder_blocks(model)
    codes = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and keep(module, name):
            qt = quantize(module.weight, spec)
            set_linear_weight(module, dequantize(qt))
            codes[name] = qt
    return model, codes
