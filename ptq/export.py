"""Export to the compressed-tensors "pack-quantized" layout, which transformers and vLLM load.

    res = ptq.quantize_model(model, "int4-g128", "gptq", calib=blocks)
    save_compressed_tensors(model, res.quantized, "llama-int4-g128", tokenizer=tok)
    AutoModelForCausalLM.from_pretrained("llama-int4-g128")  # with compressed-tensors installed

Layout of one quantized nn.Linear NAME, weight (out, in), b bits, n = in/G groups (1 for -ch):
  NAME.weight_packed      int32 (out, ceil(in*b/32)). Row r's signed codes c, -2^(b-1)..2^(b-1)-1,
                          are offset to c + 2^(b-1) in 0..2^b-1 and laid end to end: code j fills
                          bits j*b .. j*b+b-1 of the row's bit stream, stream bit k being bit
                          k % 32 of word k // 32 (8 int4 or 16 int2 codes a word; a 3-bit code may
                          straddle two words: the dense packing of compressed-tensors >= 0.18,
                          where 0.17 padded odd widths to floor(32/b) codes a word).
  NAME.weight_scale       float32 (out, n); (1,) for -t.
  NAME.weight_zero_point  asymmetric only: the signed zero points z (out, n) packed the same way
                          down each column, int32 (ceil(out*b/32), n); for -t a plain int8 (1,).
  NAME.weight_shape       int64 [out, in].
The loader unpacks and computes w = (c - z) * s in the scale's dtype
(compressed_tensors.quantization.lifecycle.forward.dequantize), then casts w to the model's dtype.

Grid mapping. The toolkit's asymmetric int{b} grid has codes q in 0..2^b-1 and an integer zero
point z_q in the same range, w = (q - z_q) * s; compressed-tensors keeps signed codes, so both move
down by 2^(b-1): c = q - 2^(b-1), z = z_q - 2^(b-1), and c - z = q - z_q leaves every weight as
it was. int{b}-sym already has codes -2^(b-1)..2^(b-1)-1 and zero 0, compressed-tensors' symmetric
grid (no zero point stored). Both use all 2^b codes, for b = 2..8, with -gG, -ch and -t.

Scales and exactness. Scales are stored in float32, the toolkit's own, whatever the model's dtype
(declared as scale_dtype in the config), and config.json asks transformers to dequantize while
loading (`"dequantize": true` in quantization_config, a CompressedTensorsConfig option vLLM
ignores). transformers then computes (c - z) * s in float32 and casts once: every loaded weight is
`ptq.dequantize(qt).to(model dtype)` bit for bit, in float32, bfloat16 and float16 alike
(tests/ptq/test_export.py). Two reasons for that option: transformers' other path, which keeps
the layers packed until the first forward, (1) creates weight_scale in the model's dtype, rounding
the float32 scales (measured on bf16 and fp16 tiny Llamas, int4-sym-g16: about 11% of the loaded
weights one ulp away from the toolkit's, max |dw| 4.9e-4 in bf16, 6.1e-5 in fp16 at |w| <= 0.09),
and (2) with compressed-tensors 0.20 / transformers 5.24 cannot load asymmetric -g/-ch checkpoints
at all: it sizes weight_zero_point unpacked, (out, n), and refuses the packed (ceil(out*b/32), n)
tensor that compressed-tensors' own compressor writes.

config.json's quantization_config is built with compressed-tensors' QuantizationConfig,
QuantizationScheme and QuantizationArgs (format "pack-quantized", status "compressed"): one group
that targets "Linear" and ignores the linear layers left in full precision (lm_head). Everything
else (embeddings, norms, lm_head, tied weights) is written by `save_pretrained` as it is.

Refused before anything is written (ExportError), each with the alternative: floating-point grids
(e2m1, e4m3, ...: pack-quantized packs integer codes, and the float formats of compressed-tensors
fix the scales' dtype (nvfp4: fp8 per 16, mxfp4: powers of two per 32) or the grid (fp8: OCP e4m3,
max 448, where the toolkit's e4m3 reaches 480), so the weights would change); layers that are not
nn.Linear (GPT-2's Conv1D) or whose weight is tied to another tensor; layers on several specs
(the format could say so, but transformers 5.24 dequantizes every layer with the first config
group's scheme); codes that do not match the model's weights; an `out_dir` that exists. The
toolkit's own format, `ptq.save_quantized`, holds all of these.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError
from .formats import QuantizedTensor, QuantSpec, dequantize, parse_spec

__all__ = ["EXPORT_FORMATS", "check_compressed_tensors_spec", "compressed_tensors_config",
           "compressed_tensors_layer", "save_compressed_tensors"]

_ALTERNATIVE = "or save it in the toolkit's own format with ptq.save_quantized"
_REQUIREMENT = "compressed-tensors>=0.18"  # the dense packing of odd bit widths


def _require_compressed_tensors() -> None:
    from packaging.version import Version

    try:
        import compressed_tensors
    except ImportError:
        raise ExportError(f"exporting to compressed-tensors needs its package: pip install "
                          f"'{_REQUIREMENT}' {_ALTERNATIVE}") from None
    if Version(compressed_tensors.__version__) < Version(_REQUIREMENT.split(">=")[1]):
        raise ExportError(f"compressed-tensors {compressed_tensors.__version__} packs 3/5/6/7-bit "
                          f"codes differently from the layout this export writes; pip install -U "
                          f"'{_REQUIREMENT}' {_ALTERNATIVE}")


def check_compressed_tensors_spec(spec: QuantSpec | str, where: str = "") -> QuantSpec:
    """The parsed spec when the pack-quantized layout holds it exactly, else an ExportError.
    Cheap: call it before a long quantization run whose result is to be exported."""
    spec = parse_spec(spec)
    if spec.kind != "int":
        at = f" ({where})" if where else ""
        raise ExportError(
            f"{spec}{at}: compressed-tensors packs integer grids only, and its float formats "
            "(nvfp4, mxfp4, OCP fp8) scale or round differently, so the weights would change; "
            f"quantize with an int{{b}} spec {_ALTERNATIVE}")
    return spec  # int2..int8, -sym or not, -gG / -ch / -t: all held exactly


def compressed_tensors_layer(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """One quantized linear layer in the pack-quantized layout (module docstring), keyed by the
    local names weight_packed, weight_scale, weight_shape (and weight_zero_point), on the CPU."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    spec = check_compressed_tensors_spec(qt.spec)
    offset = 0 if spec.symmetric else 2 ** (spec.bits - 1)  # unsigned toolkit codes -> signed
    codes = (qt.codes.cpu().to(torch.int16) - offset).to(torch.int8)
    scale = qt.scale.detach().cpu().to(torch.float32)
    out = {"weight_packed": pack_to_int32(codes, spec.bits),
           "weight_scale": scale.reshape(1) if spec.granularity == "tensor" else scale.contiguous(),
           "weight_shape": torch.tensor(list(qt.shape), dtype=torch.int64)}
    if qt.zero is not None:
        zero = (qt.zero.cpu().to(torch.int16) - offset).to(torch.int8)  # (out, n)
        out["weight_zero_point"] = (zero.reshape(1) if spec.granularity == "tensor"
                                    else pack_to_int32(zero, spec.bits, packed_dim=0))
    return out


def _quantization_args(spec: QuantSpec):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric,
                            strategy=spec.granularity, scale_dtype=torch.float32,
                            group_size=spec.group_size if spec.granularity == "group" else None)


def compressed_tensors_config(model: nn.Module, spec: QuantSpec, layers: set[str]):
    """compressed-tensors' QuantizationConfig for the named linear layers of `model` on `spec`:
    it targets "Linear" and ignores the linear layers left in full precision (e.g. lm_head)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=_quantization_args(spec))
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                              quantization_status="compressed", ignore=ignore)


def _check_layer(model: nn.Module, name: str, qt: QuantizedTensor, shared: set[int]) -> QuantSpec:
    """Refuse a layer the format cannot hold, or codes that do not describe the model's weight."""
    spec = check_compressed_tensors_spec(qt.spec, name)
    fix = "pass the PTQResult.quantized of this model, right after quantize_model"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ExportError(f"quantized layer {name} is not a module of "
                          f"{type(model).__name__}; {fix}") from None
    if not isinstance(module, nn.Linear):
        raise ExportError(f"{name} is a {type(module).__name__}; compressed-tensors packs "
                          "nn.Linear layers only: leave it out of the quantized layers "
                          f"{_ALTERNATIVE}")
    if module.weight.data_ptr() in shared:
        raise ExportError(f"{name} shares its weight with another tensor (tied embeddings); "
                          f"leave it out of the quantized layers {_ALTERNATIVE}")
    if tuple(module.weight.shape) != tuple(qt.shape):
        raise ExportError(f"{name}: codes of shape {tuple(qt.shape)}, weight of shape "
                          f"{tuple(module.weight.shape)}; {fix}")
    rows, cols = qt.shape
    blocks = {"group": (rows, cols // max(spec.group_size, 1)), "channel": (rows, 1),
              "tensor": (1, 1)}[spec.granularity]
    zero_fits = qt.zero is None or (tuple(qt.zero.shape) == blocks and not
                                    qt.zero.is_floating_point() and 0 <= int(qt.zero.min())
                                    and int(qt.zero.max()) <= spec.qmax)
    fits = (not qt.codes.is_floating_point()
            and spec.qmin <= int(qt.codes.min()) <= int(qt.codes.max()) <= spec.qmax
            and tuple(qt.scale.shape) == blocks and (qt.zero is None) == spec.symmetric
            and zero_fits)
    if not fits:
        raise ExportError(f"{name}: codes, scales or zero points do not fit {spec} of a "
                          f"{tuple(qt.shape)} weight; quantize it again with ptq.quantize")
    with torch.no_grad():
        w_hat = dequantize(qt).to(device=module.weight.device, dtype=module.weight.dtype)
        if not torch.equal(module.weight, w_hat):
            diff = float((module.weight - w_hat).abs().max())
            raise ExportError(f"{name}: the model's weight differs from its codes by up to "
                              f"{diff:.3g}, so the export would not be this model; {fix}")
    return spec


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def save_compressed_tensors(model: nn.Module, quantized: dict[str, QuantizedTensor],
                            out_dir: str | Path, *, tokenizer=None) -> Path:
    """Write `model`, its layers in `quantized` packed, as a compressed-tensors checkpoint into
    the new folder `out_dir`: config.json, model.safetensors, generation_config.json and the
    tokenizer when given. Every layer is checked before anything is written; the files go into a
    temporary folder next to `out_dir`, renamed into place at the end, so a failure leaves
    nothing. Raises ExportError (module docstring) for what the format cannot hold and when
    `out_dir` exists. Needs the `compressed-tensors` package (also to load the result)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ExportError(f"{out_dir} exists already; choose a new folder (an export never "
                          "writes into an existing one)")
    if not quantized:
        raise ExportError("no quantized layers to export; pass PTQResult.quantized")
    _require_compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor

    uses = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    shared = {ptr for ptr, n in uses.items() if n > 1}
    specs = {name: _check_layer(model, name, qt, shared) for name, qt in quantized.items()}
    if len(set(specs.values())) > 1:
        counts = {str(s): n for s, n in Counter(specs.values()).items()}
        raise ExportError(f"the layers use {len(counts)} specs {counts}; transformers' "
                          "compressed-tensors loader dequantizes every layer with one scheme, so "
                          f"export a model quantized with one spec {_ALTERNATIVE}")
    config = compressed_tensors_config(model, next(iter(specs.values())), set(specs))
    state = model.state_dict()  # tied tensors keep sharing storage: save_pretrained drops copies
    for name, qt in quantized.items():
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": t for key, t in compressed_tensors_layer(qt).items()})

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, state_dict=state)
        ModelCompressor(quantization_config=config).update_config(tmp)  # its config block
        path = tmp / "config.json"
        data = json.loads(path.read_text())
        data["quantization_config"]["dequantize"] = True  # float32 scales; why: module docstring
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        mask = _umask()
        for f in tmp.iterdir():  # model.safetensors comes out 0o600, the folder 0o700
            os.chmod(f, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
    return out_dir


# Export formats by name, for a CLI's --format: each function takes (model, quantized, out_dir,
# *, tokenizer) and refuses, before writing, what its format cannot hold.
EXPORT_FORMATS = {"compressed-tensors": save_compressed_tensors}
