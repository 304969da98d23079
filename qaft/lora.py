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

from ptq.errors import OptionsError
from ptq.formats import QuantizedTensor, QuantSpec, dequantize, parse_spec, quantize
from ptq.layers import (FilterFn, linear_weight, quantizable_linears, select_linears,
                        set_linear_weight)

__all__ = ["LoraOptions", "LORA_INITS", "prepare_lora", "merge_and_requantize", "MERGED_NOTE"]

MERGED_NOTE = ("LoRA merged into the quantized base, then re-quantized with RTN: evaluated after "
               "re-quantization, not before")


LORA_INITS = ("rtn", "gptq")


@dataclass(frozen=True)
class LoraOptions:
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    init: str = field(default="rtn", metadata={
        "help": "the frozen base: rtn, or gptq (the GPTQ solution on the same budget)"})
    seed: int = field(default=0, metadata={"help": "seed of the adapters' initialization"})

    def __post_init__(self):
        if self.rank < 1:
            raise OptionsError(f"LoRA rank={self.rank} must be >= 1")
        if not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise OptionsError(f"LoRA alpha={self.alpha} must be > 0 and dropout="
                               f"{self.dropout} in [0, 1)")
        if self.init not in LORA_INITS:
            raise OptionsError(f"LoRA init={self.init!r}: use one of {', '.join(LORA_INITS)} "
                               "(the base is frozen, so scale choices such as mse do not apply)")


def prepare_lora(model: nn.Module, spec: QuantSpec | str, options: LoraOptions = LoraOptions(),
                 filter_fn: FilterFn | None = None,
                 init: dict[str, QuantizedTensor] | None = None):
    """Snap the selected linear layers onto the grid (RTN, or the PTQ solution `init` maps them
    to), freeze everything, add LoRA adapters to those layers. Returns the peft model (train it
    with `finetune`)."""
    from peft import LoraConfig, get_peft_model

    spec = parse_spec(spec)
    chosen = select_linears(model, filter_fn)
    names = [n for n, _ in chosen]
    for name, module in chosen:
        spec.check_shape(linear_weight(module).shape[1], name)
    if init is not None and any(n not in init for n in names):
        raise OptionsError("init must hold a PTQ solution for every selected layer")
    with torch.no_grad():
        for name, module in chosen:
            qt = init[name] if init is not None else quantize(linear_weight(module), spec)
            set_linear_weight(module, dequantize(qt))
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=names, bias="none")
    # peft draws A from the global RNG: seed it for this call only, and leave it as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        return get_peft_model(model, config)


@torch.no_grad()
def merge_and_requantize(peft_model, spec: QuantSpec | str, filter_fn: FilterFn | None = None
                         ) -> tuple[nn.Module, dict[str, QuantizedTensor]]:
    """Merge the adapters, re-quantize the merged layers with RTN; (model, codes)."""
    spec = parse_spec(spec)
    model = peft_model.merge_and_unload()
    codes = {}
    for name, module in quantizable_linears(model, filter_fn):
        qt = quantize(linear_weight(module), spec)
        set_linear_weight(module, dequantize(qt))
        codes[name] = qt
    return model, codes
