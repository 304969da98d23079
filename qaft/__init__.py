"""Quantization-aware fine-tuning (QAFT) with a straight-through estimator, on the PTQ budget.

Fake quantization reuses `ptq.formats`, so QAFT and PTQ mean exactly the same grid.
"""

from . import lora, train
from .fake_quant import INITS, SCALE_MODES, FakeQuantLinear, convert, fake_quant_layers, prepare
from .lora import LoraOptions, merge_and_requantize, prepare_lora
from .train import TrainConfig, TrainResult, finetune

__all__ = ["FakeQuantLinear", "INITS", "LoraOptions", "SCALE_MODES", "TrainConfig", "TrainResult",
           "convert", "fake_quant_layers", "finetune", "lora", "merge_and_requantize", "prepare",
           "prepare_lora", "train"]
