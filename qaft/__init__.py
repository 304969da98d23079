"""Quantization-aware fine-tuning (QAFT) with a straight-through estimator, on the PTQ budget.

Fake quantization reuses `ptq.formats`, so QAFT and PTQ mean exactly the same grid.
"""

from .fake_quant import INITS, SCALE_MODES, FakeQuantLinear, convert, fake_quant_layers, prepare

__all__ = ["FakeQuantLinear", "INITS", "SCALE_MODES", "convert", "fake_quant_layers", "prepare"]
