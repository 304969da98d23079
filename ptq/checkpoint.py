"""Quantized checkpoints: packed integer codes plus scales/zeros and the spec, in safetensors.

A folder holds `config.json` (the model's own) and `qalign.safetensors` with, per quantized
layer NAME (weight read as (out, in), see `ptq.apply.linear_weight`):
  NAME.qcodes  uint8, the codes bit-packed LSB first, `spec.bits` bits each, row-major;
  NAME.scale   (rows, n_blocks) scales;   NAME.zero  (rows, n_blocks) uint8 zero points (asym);
and every other tensor of the state dict as it is. The safetensors metadata "qalign" is JSON:
{"version": 1, "layers": {NAME: {"spec", "shape", "dtype"}}, "aliases": {tied: source}}.
Loading rebuilds the model from its config and writes the dequantized weights, so the loaded
model computes exactly what the in-memory quantized model computed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .apply import set_linear_weight
from .formats import QuantizedTensor, dequantize, parse_spec

__all__ = ["CHECKPOINT_FILE", "pack_bits", "unpack_bits", "save_quantized", "load_quantized",
           "is_quantized_checkpoint"]

CHECKPOINT_FILE = "qalign.safetensors"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _unsigned(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    c = codes.to(torch.int64)
    return c + 2 ** (bits - 1) if signed else c


def pack_bits(codes: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """Codes (any shape, values in [0, 2^bits) or, signed, [-2^(bits-1), 2^(bits-1))) as a
    uint8 bit stream, LSB first: ceil(numel * bits / 8) bytes."""
    c = _unsigned(codes, bits, signed).reshape(-1)
    bit = ((c.unsqueeze(1) >> torch.arange(bits, device=c.device)) & 1).reshape(-1)
    bit = torch.nn.functional.pad(bit, (0, (-bit.numel()) % 8))
    weights = 2 ** torch.arange(8, device=c.device)
    return (bit.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int, signed: bool = False) -> torch.Tensor:
    """Inverse of pack_bits: an int64 tensor of `numel` codes."""
    bit = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1)
    bit = bit.reshape(-1)[: numel * bits].view(numel, bits)
    c = (bit * 2 ** torch.arange(bits, device=packed.device)).sum(1)
    return c - 2 ** (bits - 1) if signed else c


def _signed(spec) -> bool:
    return spec.kind == "int" and spec.symmetric


def save_quantized(model: nn.Module, quantized: dict[str, QuantizedTensor], folder: str | Path,
                   extra_meta: dict | None = None) -> Path:
    """Write config.json and qalign.safetensors (packed codes) into `folder`, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)

    tensors, aliases, layers = {}, {}, {}
    skip = {f"{name}.weight" for name in quantized}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:  # tied weights (e.g. lm_head = embed_tokens): store once
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    for name, qt in quantized.items():
        spec = qt.spec
        tensors[f"{name}.qcodes"] = pack_bits(qt.codes.cpu(), spec.bits, _signed(spec))
        tensors[f"{name}.scale"] = qt.scale.detach().contiguous().cpu()
        if qt.zero is not None:
            tensors[f"{name}.zero"] = qt.zero.contiguous().cpu()
        layers[name] = {"spec": str(spec), "shape": list(qt.codes.shape), "dtype": str(qt.dtype)}
    meta = {"version": 1, "layers": layers, "aliases": aliases, **(extra_meta or {})}
    fd, tmp = tempfile.mkstemp(prefix=".qalign-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"qalign": json.dumps(meta)})
        os.replace(tmp, folder / CHECKPOINT_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return folder


def is_quantized_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / CHECKPOINT_FILE).is_file()


def read_quantized(folder: str | Path) -> tuple[dict, dict[str, QuantizedTensor], dict]:
    """(plain tensors, quantized layers, metadata) of a checkpoint folder."""
    path = Path(folder) / CHECKPOINT_FILE
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["qalign"])
    tensors = load_file(path)
    quantized = {}
    for name, info in meta["layers"].items():
        spec = parse_spec(info["spec"])
        shape = torch.Size(info["shape"])
        codes = unpack_bits(tensors.pop(f"{name}.qcodes"), spec.bits, shape.numel(),
                            _signed(spec)).view(shape)
        zero = tensors.pop(f"{name}.zero", None)
        code_dtype = {True: torch.int8, False: torch.uint8}[_signed(spec)] if spec.kind == "int" \
            else (torch.int16 if spec.bits <= 15 else torch.int32 if spec.bits <= 31
                  else torch.int64)
        quantized[name] = QuantizedTensor(codes.to(code_dtype), tensors.pop(f"{name}.scale"), zero,
                                          spec, _DTYPES[info["dtype"]])
    return tensors, quantized, meta


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers model with the checkpoint's dequantized weights, and its QuantizedTensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors, quantized, meta = read_quantized(folder)
    for alias, source in meta["aliases"].items():
        tensors[alias] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = set(missing) - {f"{n}.weight" for n in quantized}
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match its config: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for name, qt in quantized.items():
        set_linear_weight(model.get_submodule(name), dequantize(qt))
    if meta["aliases"]:
        model.tie_weights()
    return model.eval(), quantized
