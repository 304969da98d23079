"""Quantized checkpoints: packed integer codes plus scales/zeros and the spec, in safetensors.

A folder holds `config.json` (the model's own) and `qalign.safetensors` with, per quantized
layer NAME (weight read as (out, in), see `ptq.layers.linear_weight`):
  NAME.qcodes  uint8, the codes bit-packed LSB first, `spec.bits` bits each, row-major,
               ceil(out * in * bits / 8) bytes, the padding bits of the last byte zero;
  NAME.scale   (rows, n_blocks) scales;   NAME.zero  (rows, n_blocks) uint8 zero points (asym);
and every other tensor of the state dict as it is. The safetensors metadata "qalign" is JSON:
{"version": 2, "layers": {NAME: {"spec", "shape", "dtype"}}, "aliases": {tied: source},
 "sha256": {tensor: sha256 of its dtype, shape and bytes}}, and "qalign_sha256" is the sha256 of
that JSON text. Loading checks every tensor's size against the metadata and every checksum, so a
damaged or edited file is a CheckpointError, not a model with wrong weights (version-1 files,
without checksums, get the size checks only). It then rebuilds the model from its config and
writes the dequantized weights: the loaded model computes exactly what the quantized one did.

Saving writes both files into a temporary folder next to the target and moves them in so that
no reader (and no crash) ever sees an old file beside a new one (`_move_into_place`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, QalignError
from .formats import QuantizedTensor, QuantSpec, _code_dtype, dequantize, parse_spec
from .layers import linear_weight, set_linear_weight

__all__ = ["CHECKPOINT_FILE", "pack_bits", "unpack_bits", "save_quantized", "load_quantized",
           "read_quantized", "is_quantized_checkpoint"]

CHECKPOINT_FILE = "qalign.safetensors"
VERSION = 2
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
_RESERVED = {"version", "layers", "aliases", "sha256"}  # metadata keys save_quantized writes
_FIX = "re-export it with `qalign quantize`"


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


def _digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: what loading must give back."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _layer_problem(spec: QuantSpec, shape: torch.Size, scale: torch.Tensor | None,
                   zero: torch.Tensor | None) -> str | None:
    """What is wrong with one layer's scales/zeros for its spec and weight shape, or None."""
    rows, cols = shape[:-1].numel(), shape[-1]
    if spec.granularity == "group" and cols % spec.group_size:
        return f"group size {spec.group_size} does not divide in_features={cols}"
    if spec.granularity == "group":
        want = (rows, cols // spec.group_size)
    else:
        want = (rows, 1) if spec.granularity == "channel" else (1, 1)
    if scale is None or tuple(scale.shape) != want or not scale.is_floating_point():
        got = None if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
        return f"scale is {got}, {spec} of a {tuple(shape)} weight needs float {want}"
    if not bool(torch.isfinite(scale).all()):
        return "scale holds NaN/Inf"
    if (zero is not None) != (spec.kind == "int" and not spec.symmetric):
        return f"zero points are {'present' if zero is not None else 'missing'} for {spec}"
    if zero is not None and (zero.dtype != torch.uint8 or tuple(zero.shape) != want
                             or int(zero.max()) > spec.qmax):
        return f"zero points must be uint8 {want} in 0..{spec.qmax}"
    return None


def _check_quantized(name: str, qt: QuantizedTensor) -> None:
    """Refuse to write codes that packing would silently wrap, or scales that do not fit."""
    spec = qt.spec
    lo, hi = (spec.qmin, spec.qmax) if spec.kind == "int" else (0, 2**spec.bits - 1)
    problem = _layer_problem(spec, qt.codes.shape, qt.scale, qt.zero)
    if problem is None and qt.codes.is_floating_point():
        problem = f"codes are {qt.codes.dtype}, not integers"
    if problem is None and not lo <= int(qt.codes.min()) <= int(qt.codes.max()) <= hi:
        problem = f"codes leave {lo}..{hi}"
    if problem is None and str(qt.dtype) not in _DTYPES:
        problem = f"its weight dtype {qt.dtype} is not one of {sorted(_DTYPES)}"
    if problem:
        raise CheckpointError(f"cannot save {name} ({spec}): {problem}; quantize it again "
                              "with ptq.quantize")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Move the files written in `tmp` into `folder`. A new folder is one rename of `tmp`.
    Into an existing folder (it may hold a tokenizer and reports too), the old checkpoint file
    goes first and the new one comes last, so the folder never holds an old file beside a new
    one as a checkpoint. Files get 0o666 & ~umask (mkdtemp makes the folder 0o700)."""
    mask = _umask()
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~mask)
        fd = os.open(f, os.O_RDONLY)  # on disk before the rename makes it visible
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if not folder.exists():
        os.chmod(tmp, 0o777 & ~mask)
        os.replace(tmp, folder)
        return
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == CHECKPOINT_FILE):
        os.replace(f, folder / f.name)


def save_quantized(model: nn.Module, quantized: dict[str, QuantizedTensor], folder: str | Path,
                   extra_meta: dict | None = None) -> Path:
    """Write config.json and qalign.safetensors (packed codes, checksums) into `folder`,
    replacing a checkpoint already there without ever leaving a mix of old and new files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise QalignError(f"{folder} is a file; give a folder path to save the checkpoint in")
    clash = sorted(set(extra_meta or {}) & _RESERVED)
    if clash:
        raise QalignError(f"extra_meta may not set {clash}: save_quantized writes them itself")
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config

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
        _check_quantized(name, qt)
        spec = qt.spec
        tensors[f"{name}.qcodes"] = pack_bits(qt.codes.cpu(), spec.bits, _signed(spec))
        tensors[f"{name}.scale"] = qt.scale.detach().contiguous().cpu()
        if qt.zero is not None:
            tensors[f"{name}.zero"] = qt.zero.contiguous().cpu()
        layers[name] = {"spec": str(spec), "shape": list(qt.codes.shape), "dtype": str(qt.dtype)}
    meta = {"version": VERSION, "layers": layers, "aliases": aliases, **(extra_meta or {}),
            "sha256": {key: _digest(t) for key, t in tensors.items()}}
    text = json.dumps(meta)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        config.save_pretrained(tmp)
        save_file(tensors, tmp / CHECKPOINT_FILE,
                  metadata={"qalign": text, "qalign_sha256": _text_digest(text)})
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the folder was new
    return folder


def is_quantized_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` holds a qalign checkpoint (`read_quantized` then verifies it)."""
    return (Path(folder) / CHECKPOINT_FILE).is_file()


def read_quantized(folder: str | Path) -> tuple[dict, dict[str, QuantizedTensor], dict]:
    """(plain tensors, quantized layers, metadata) of a checkpoint folder, verified: any size,
    range or checksum mismatch is a CheckpointError naming the file."""
    path = Path(folder) / CHECKPOINT_FILE

    def fail(problem: str) -> NoReturn:
        raise CheckpointError(f"{path}: {problem}; the file is damaged or was edited: {_FIX}")

    if not path.is_file():
        raise CheckpointError(f"{folder} holds no {CHECKPOINT_FILE}; write one with "
                              "`qalign quantize --out`")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
        raw = load_file(path)
    except (SafetensorError, OSError) as e:  # e.g. truncated: the header promises more bytes
        fail(f"not a readable safetensors file ({e})")
    text = header.get("qalign")
    try:
        meta = json.loads(text)
        version, layers, aliases = meta["version"], dict(meta["layers"]), dict(meta["aliases"])
    except (TypeError, ValueError, KeyError):
        fail("its 'qalign' metadata is missing or not the JSON qalign writes")
    if type(version) is not int or version not in (1, VERSION):
        fail(f"version {version!r} is not one this qalign reads (1, {VERSION})")
    if version >= 2 and header.get("qalign_sha256") != _text_digest(text):
        fail("its metadata does not match the checksum stored with it")

    tensors, quantized = dict(raw), {}
    for name, info in layers.items():
        try:
            spec = parse_spec(info["spec"])
            if not info["shape"] or any(type(d) is not int or d < 1 for d in info["shape"]):
                raise ValueError(info["shape"])
            shape, dtype = torch.Size(info["shape"]), _DTYPES[info["dtype"]]
        except (TypeError, ValueError, KeyError) as e:
            fail(f"layer {name}: bad metadata entry {info!r} ({e})")
        packed, numel = tensors.pop(f"{name}.qcodes", None), shape.numel()
        n_bytes = (numel * spec.bits + 7) // 8
        if packed is None or packed.dtype != torch.uint8 or tuple(packed.shape) != (n_bytes,):
            got = None if packed is None else f"{packed.dtype} {tuple(packed.shape)}"
            fail(f"{name}.qcodes is {got}; {numel} codes of {spec.bits} bits need uint8 "
                 f"({n_bytes},)")
        if numel * spec.bits % 8 and int(packed[-1]) >> (numel * spec.bits % 8):
            fail(f"{name}.qcodes has bits set past its last code")
        scale, zero = tensors.pop(f"{name}.scale", None), tensors.pop(f"{name}.zero", None)
        problem = _layer_problem(spec, shape, scale, zero)
        if problem:
            fail(f"layer {name}: {problem}")
        codes = unpack_bits(packed, spec.bits, numel, _signed(spec)).view(shape)
        quantized[name] = QuantizedTensor(codes.to(_code_dtype(spec)), scale, zero, spec, dtype)
    missing = sorted(set(aliases.values()) - set(tensors))
    if missing:
        fail(f"tied weights point to tensors it lacks: {missing[:3]}")
    if version >= 2:  # sizes are right; now the bytes themselves (a flipped bit, an edit)
        digests = meta.get("sha256")
        if not isinstance(digests, dict) or set(digests) != set(raw):
            fail("its tensors are not the ones its checksums list")
        bad = [key for key, t in raw.items() if _digest(t) != digests[key]]
        if bad:
            fail(f"the bytes of {len(bad)} tensor(s), e.g. {bad[0]}, do not match their sha256")
    return tensors, quantized, meta


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers model with the checkpoint's dequantized weights, and its QuantizedTensors.
    Raises CheckpointError when the file is damaged or does not fit its config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tensors, quantized, meta = read_quantized(folder)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for alias, source in meta["aliases"].items():
        tensors[alias] = tensors[source]
    params = model.state_dict()
    for name, qt in quantized.items():  # a layer the config lacks, or of another shape
        if params.get(f"{name}.weight") is None or \
                linear_weight(model.get_submodule(name)).shape != qt.shape:
            raise CheckpointError(f"{folder}: layer {name} {tuple(qt.shape)} of "
                                  f"{CHECKPOINT_FILE} is not in its config.json; {_FIX}")
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a tensor's shape differs from the config's
        raise CheckpointError(f"{folder}: {CHECKPOINT_FILE} does not fit its config.json "
                              f"({str(e).splitlines()[-1].strip()}); {_FIX}") from None
    missing = set(missing) - {f"{n}.weight" for n in quantized}
    if missing or unexpected:
        raise CheckpointError(f"{folder}: {CHECKPOINT_FILE} does not fit its config.json: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
                              f"; {_FIX}")
    for name, qt in quantized.items():
        set_linear_weight(model.get_submodule(name), dequantize(qt))
    if meta["aliases"]:
        model.tie_weights()
    return model.eval(), quantized
