"""Layer-wise, error-minimizing post-training quantizers on one shared grid (`ptq.formats`).

One entry point quantizes a model with any registered method: `quantize_model`.
"""

from . import checkpoint
from .apply import BlockRecord, LayerRecord, PTQResult, quantize_model
from .arch import ARCHS, Arch, ArchError, decoder_blocks, register_arch
from .capture import BlockInputs, capture_block_inputs
from .checkpoint import load_quantized, save_quantized
from .errors import CheckpointError, ExportError, NonFiniteError, OptionsError, QalignError
from .formats import (ClipSearch, QParams, QuantizedTensor, QuantSpec, SpecError, compute_qparams,
                      dequantize, fake_quantize, fake_quantize_with, parse_spec, quantize)
from .gptq import GPTQOptions, GPTQResult, gptq_quantize, inverse_cholesky
from .hessian import HessianAccumulator
from .layers import (FilterFn, in_decoder_blocks, is_linear, linear_weight, quantizable_linears,
                     set_linear_weight)
from .metrics import (layer_loss, output_energy, relative_output_error,
                      relative_output_error_from_hessian, relative_output_error_grad,
                      weight_relative_error)
from .registry import (METHODS, PLUGIN_ERRORS, BlockData, LayerStats, Method, QuantResult,
                       UnknownMethodError, available_methods, get_method, register_block_method,
                       register_method)
from .rtn import RTNOptions, rtn_quantize
from .validate import MethodResultError, check_result
from . import hqq  # registers "hqq"

__all__ = [
    "ARCHS", "Arch", "ArchError", "BlockData", "BlockInputs", "BlockRecord", "MethodResultError",
    "PLUGIN_ERRORS", "available_methods", "check_result", "register_block_method",
    "CheckpointError", "ClipSearch",
    "ExportError", "NonFiniteError", "FilterFn", "GPTQOptions", "GPTQResult",
    "HessianAccumulator", "hqq", "LayerRecord", "LayerStats", "METHODS", "Method", "OptionsError",
    "PTQResult", "QParams", "QalignError", "QuantResult", "QuantSpec", "QuantizedTensor",
    "RTNOptions", "SpecError", "UnknownMethodError", "capture_block_inputs", "checkpoint",
    "compute_qparams",
    "decoder_blocks", "dequantize", "fake_quantize", "fake_quantize_with", "get_method",
    "gptq_quantize", "in_decoder_blocks", "inverse_cholesky", "is_linear", "layer_loss",
    "linear_weight", "load_quantized", "output_energy", "parse_spec", "quantizable_linears",
    "quantize", "quantize_model", "register_arch", "register_method", "relative_output_error",
    "relative_output_error_from_hessian", "relative_output_error_grad", "rtn_quantize",
    "save_quantized", "set_linear_weight", "weight_relative_error",
]
