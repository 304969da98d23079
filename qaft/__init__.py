"""Quantization-aware fine-tuning (QAFT) with a straight-through estimator, on the PTQ budget.

Fake quantization reuses `ptq.formats`, so QAFT and PTQ mean exactly the same grid. One call per
mode: `finetune_qaft`, `finetune_lora`, `finetune_fp` (qaft.finetuning); the loop underneath is
`qaft.train.finetune`.
"""

from . import block_ap, distill, lora, train  # block_ap registers the block method "block-ap"
from .block_ap import BlockAPOptions
from .fake_quant import (INITS, SCALE_MODES, FakeQuantLinear, QAFTConfig, convert,
                         fake_quant_layers, prepare, weights_computed_once)
from .finetuning import (QAFT_SEARCH_SPACE, FinetuneResult, finetune_fp, finetune_lora,
                         finetune_qaft, trial_configs)
from .lora import LoraOptions, merge_and_requantize, prepare_lora
from .train import TrainConfig, TrainResult, finetune

__all__ = ["BlockAPOptions", "FakeQuantLinear", "FinetuneResult", "INITS", "LoraOptions",
           "QAFTConfig", "QAFT_SEARCH_SPACE", "SCALE_MODES", "TrainConfig", "TrainResult",
           "block_ap", "convert", "distill", "fake_quant_layers", "finetune", "finetune_fp",
           "finetune_lora", "finetune_qaft", "lora", "merge_and_requantize", "prepare",
           "prepare_lora", "train", "trial_configs", "weights_computed_once"]
