"""Layer-wise, error-minimizing post-training quantizers on one shared grid (`ptq.formats`)."""

from . import checkpoint
from .apply import (LayerReport, QuantizedModel, in_decoder_blocks, is_linear, linear_weight, quantizable_linears,
                    quantize_model, set_linear_weight)
from .arch import ARCHS, Arch, ArchError, decoder_blocks, register_arch
from .formats import (ClipSearch, QParams, QuantizedTensor, QuantSpec, SpecError, compute_qparams,
                      dequantize, fake_quantize, fake_quantize_with, parse_spec, quantize)
from .gptq import GPTQOptions, GPTQResult, gptq_quantize, inverse_cholesky
from .metrics import layer_loss, relative_output_error, relative_output_error_from_hessian
from .hessian import HessianAccumulator
from .registry import METHODS, LayerStats, Method, QuantResult, get_method, register_method
from .sequential import LayerRow, SequentialResult, capture_block_inputs, quantize_sequential
from .rtn import RTNOptions, rtn_quantize

from .checkpoint import load_quantized, save_quantized

__all__ = [
    "checkpoint", "load_quantized", "save_quantized", "QuantizedModel",
    "LayerRow", "SequentialResult", "capture_block_inputs", "quantize_sequential",
    "GPTQOptions", "GPTQResult", "HessianAccumulator", "gptq_quantize", "inverse_cholesky",
    "layer_loss", "relative_output_error", "relative_output_error_from_hessian", "ARCHS", "Arch", "ArchError", "ClipSearch", "LayerReport", "LayerStats", "METHODS", "Method",
    "QParams", "QuantResult", "QuantSpec", "QuantizedTensor", "RTNOptions", "SpecError",
    "compute_qparams", "decoder_blocks", "dequantize", "fake_quantize", "fake_quantize_with",
    "get_method", "in_decoder_blocks", "is_linear", "linear_weight", "parse_spec",
    "quantizable_linears", "quantize", "quantize_model", "register_arch", "register_method",
    "rtn_quantize", "set_linear_weight",
]
