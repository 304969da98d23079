"""ptq.export: compressed-tensors pack-quantized checkpoints load in transformers to exactly the
toolkit's dequantized model.

Tolerances. Scales are stored in float32 and transformers dequantizes them while loading, so the
loaded weights are ptq.dequantize(qt) (cast to the model's dtype) bit for bit and the logits are
compared with tolerance 0, in float32 and bfloat16. The one rounding left is the one of
transformers' other load path (layers kept packed until the first forward), which casts scales to
the model's dtype: measured here, it stays within one ulp of each weight in bf16 and fp16.
"""

import json
import os
import sys

import pytest
import torch

pytest.importorskip("compressed_tensors", minversion="0.18", reason="exporting needs the "
                    "compressed-tensors package: pip install 'compressed-tensors>=0.18'")

from compressed_tensors.compressors.pack_quantized import base, helpers  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig  # noqa: E402

import ptq  # noqa: E402
from compare.models import tiny_model  # noqa: E402
from ptq.checkpoint import pack_bits  # noqa: E402
from ptq.errors import ExportError  # noqa: E402
from ptq.formats import expand_blocks  # noqa: E402
from ptq.export import (check_compressed_tensors_spec, compressed_tensors_layer,  # noqa: E402
                        save_compressed_tensors)
from tests.conftest import make_tokenizer  # noqa: E402

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def calib():
    return torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))


def quantized_tiny(spec, method="rtn", **config):
    model = tiny_model("llama", seed=4, **config)
    kw = {"calib": calib()} if method == "gptq" else {}
    return model, ptq.quantize_model(model, spec, method, progress=False, **kw).quantized


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_loads_exactly(model, quantized, folder, **load_kw):
    """The loaded model's layers equal ptq.dequantize, every other tensor is the model's own,
    and the logits are identical."""
    loaded = AutoModelForCausalLM.from_pretrained(folder, **load_kw)
    assert loaded.dtype == model.dtype
    ours = model.state_dict()
    for key, t in loaded.state_dict().items():
        name = key.removesuffix(".weight")
        want = ptq.dequantize(quantized[name]).to(t.dtype) if name in quantized else ours[key]
        assert torch.equal(t, want), key
    assert torch.equal(logits(loaded), logits(model))  # tolerance 0: same weights, same math
    return loaded


@pytest.mark.parametrize("spec,method", [
    ("int4-g16", "rtn"), ("int4-sym-g16", "rtn"), ("int3-g16", "gptq"), ("int3-sym-g32", "rtn"),
    ("int2-g16", "rtn"), ("int2-sym-g32", "gptq"), ("int4-ch", "rtn"), ("int4-sym-ch", "gptq"),
    ("int8-g16", "rtn"), ("int5-t", "rtn")])
def test_exported_checkpoint_loads_to_the_toolkits_model(tmp_path, spec, method):
    model, quantized = quantized_tiny(spec, method)
    folder = save_compressed_tensors(model, quantized, tmp_path / "ct")
    assert_loads_exactly(model, quantized, folder)

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    parsed = ptq.parse_spec(spec)
    (group,) = qc["config_groups"].values()
    assert (qc["format"], qc["quantization_status"], qc["ignore"]) == \
        ("pack-quantized", "compressed", ["lm_head"])
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy",
                                             "group_size")} == {
        "num_bits": parsed.bits, "type": "int", "symmetric": parsed.symmetric,
        "strategy": parsed.granularity,
        "group_size": parsed.group_size if parsed.granularity == "group" else None}


@pytest.mark.parametrize("spec", ["int4-g16", "int4-sym-g16", "int3-ch", "int2-sym-ch", "int8-g32"])
def test_layout_is_what_compressed_tensors_itself_writes_and_reads(spec):
    _, quantized = quantized_tiny(spec)
    qt = quantized["model.layers.1.mlp.down_proj"]  # (64, 128)
    ours = compressed_tensors_layer(qt)
    parsed = ptq.parse_spec(spec)
    scheme = QuantizationScheme(targets=["Linear"], weights={
        "num_bits": parsed.bits, "symmetric": parsed.symmetric, "strategy": parsed.granularity,
        "group_size": parsed.group_size if parsed.granularity == "group" else None})

    # signed codes: c - z equals the toolkit's q - z_q, element by element
    c = helpers.unpack_from_int32(ours["weight_packed"], parsed.bits, qt.shape).to(torch.int64)
    if parsed.symmetric:
        assert "weight_zero_point" not in ours
        assert torch.equal(c, qt.codes.to(torch.int64))
        zero = None
    else:
        zero = helpers.unpack_from_int32(ours["weight_zero_point"], parsed.bits,
                                         qt.scale.shape, packed_dim=0)
        assert torch.equal(c - expand_blocks(zero.to(torch.int64), qt.shape, parsed),
                           qt.codes.to(torch.int64) - expand_blocks(
                               qt.zero.to(torch.int64), qt.shape, parsed))
        half = 2 ** (parsed.bits - 1)
        assert -half <= int(zero.min()) <= int(zero.max()) < half

    # the bit layout of the module docstring: each row's codes + 2^(b-1) as one LSB-first bit
    # stream (the toolkit's own pack_bits), read as little-endian int32 words; 128 columns
    unsigned = qt.codes.to(torch.int64) + (2 ** (parsed.bits - 1) if parsed.symmetric else 0)
    stream = torch.stack([pack_bits(row, parsed.bits) for row in unsigned])
    if sys.byteorder == "little":
        assert torch.equal(stream.view(torch.int32), ours["weight_packed"])

    # compressed-tensors' own compressor, given the dequantized weight, packs the same bits
    theirs = base.PackedQuantizationCompressor.compress(
        {"weight": ptq.dequantize(qt), "weight_scale": qt.scale,
         **({} if zero is None else {"weight_zero_point": zero})}, scheme)
    assert theirs.keys() == ours.keys()
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key
    # and its decompressor gives ptq.dequantize back exactly
    back = base.PackedQuantizationCompressor.decompress(ours, scheme)["weight"]
    assert torch.equal(back, ptq.dequantize(qt))


@pytest.mark.parametrize("spec", ["int4-g16", "int3-sym-ch"])
def test_bf16_model_loads_exactly_with_float32_scales(tmp_path, spec):
    saved = tmp_path / "fp"
    tiny_model("llama", seed=4).save_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16).eval()
    quantized = ptq.quantize_model(model, spec, progress=False).quantized
    folder = save_compressed_tensors(model, quantized, tmp_path / "ct")
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight_scale").get_dtype() == "F32"
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    assert_loads_exactly(model, quantized, folder)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # on purpose
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scales_in_the_model_dtype_move_weights_by_at_most_one_ulp(tmp_path, dtype):
    """The effect of rounding scales to the model's dtype, as transformers' packed load path does
    (dequantize=False). Measured on this model, int4-sym-g16, |w| <= 0.089: max |dw| = 4.9e-4 in
    bf16 and 6.1e-5 in fp16, one ulp, on about 11% of the weights (the rest are unchanged)."""
    saved = tmp_path / "fp"
    tiny_model("llama", seed=4).save_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype).eval()
    quantized = ptq.quantize_model(model, "int4-sym-g16", progress=False).quantized
    folder = save_compressed_tensors(model, quantized, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=False))
    logits(loaded)  # this path unpacks on the first forward
    eps, moved = torch.finfo(dtype).eps, 0
    for name, qt in quantized.items():
        w, ref = loaded.get_submodule(name).weight.float(), ptq.dequantize(qt).float()
        ulp = eps * torch.maximum(w.abs(), ref.abs())  # an ulp of x is at most eps * |x|
        assert bool(((w - ref).abs() <= ulp).all()), name
        moved += int((w != ref).sum())
    assert moved > 0  # the rounding is real: that is why float32 scales are stored


def test_tied_embeddings_tokenizer_and_file_modes(tmp_path, text_file):
    tokenizer = make_tokenizer(text_file.read_text().split("\n\n"))
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=2, tie_word_embeddings=True)
    quantized = ptq.quantize_model(model, "int3-sym-ch", "gptq", calib=calib(),
                                   progress=False).quantized
    folder = save_compressed_tensors(model, quantized, tmp_path / "ct", tokenizer=tokenizer)

    loaded = assert_loads_exactly(model, quantized, folder)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    text = "the quick brown fox"
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == tokenizer(text)["input_ids"]
    mask = os.umask(0)
    os.umask(mask)
    assert {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()} == \
        {f.name: 0o666 & ~mask for f in folder.iterdir()}


def test_check_spec_accepts_int_grids_and_refuses_float_ones():
    for spec in ("int2-g32", "int3-sym-ch", "int8-t", "int4-sym-g128"):
        assert check_compressed_tensors_spec(spec) == ptq.parse_spec(spec)
    for spec in ("e2m1-g32", "fp8-ch", "e3m2-t"):
        with pytest.raises(ExportError, match="integer grids only.*ptq.save_quantized"):
            check_compressed_tensors_spec(spec)


def _float_grid():
    return quantized_tiny("e2m1-g16")


def _gpt2_conv1d():
    model = tiny_model("gpt2", seed=1)
    return model, ptq.quantize_model(model, "int4-g16", progress=False).quantized


def _tied_lm_head():
    model = tiny_model("llama", seed=1, tie_word_embeddings=True)
    return model, ptq.quantize_model(model, "int4-g16", progress=False,
                                     filter_fn=lambda m, n: n == "lm_head").quantized


def _weights_changed_after_quantizing():
    model, quantized = quantized_tiny("int4-g16")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    return model, quantized


def _mixed_specs():
    model = tiny_model("llama", seed=1)
    attn = ptq.quantize_model(model, "int4-g16", progress=False,
                              filter_fn=lambda m, n: "self_attn" in n).quantized
    mlp = ptq.quantize_model(model, "int3-sym-ch", progress=False,
                             filter_fn=lambda m, n: ".mlp." in n).quantized
    return model, {**attn, **mlp}


def _codes_of_another_model():
    model, _ = quantized_tiny("int4-g16")
    return model, quantized_tiny("int4-g16", hidden_size=32)[1]


@pytest.mark.parametrize("make,match", [
    (_float_grid, r"e2m1-g16 \(model.layers.0.self_attn.q_proj\): compressed-tensors packs "
                  r"integer grids only.*ptq.save_quantized"),
    (_gpt2_conv1d, r"is a Conv1D; compressed-tensors packs nn.Linear layers only.*save_quantized"),
    (_tied_lm_head, r"lm_head shares its weight.*save_quantized"),
    (_weights_changed_after_quantizing, r"up_proj: the model's weight differs from its codes "
                                        r"by up to 0.001"),
    (_mixed_specs, r"the layers use 2 specs \{'int4-g16': 8, 'int3-sym-ch': 6\}; .*one scheme"),
    (_codes_of_another_model, r"codes of shape \(32, 32\), weight of shape \(64, 64\)"),
])
def test_refusals_name_the_problem_and_write_nothing(tmp_path, make, match):
    model, quantized = make()
    with pytest.raises(ExportError, match=match) as e:
        save_compressed_tensors(model, quantized, tmp_path / "out" / "ct")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # not even the parent folder


def test_existing_folder_is_refused_and_left_as_it_was(tmp_path):
    model, quantized = quantized_tiny("int4-g16")
    folder = tmp_path / "ct"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists already; choose a new folder"):
        save_compressed_tensors(model, quantized, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("version,match", [
    (None, r"needs its package: pip install 'compressed-tensors>=0.18' or .*save_quantized"),
    ("0.17.1", r"compressed-tensors 0.17.1 packs 3/5/6/7-bit codes differently.*>=0.18"),
])
def test_missing_or_old_compressed_tensors_is_refused(tmp_path, monkeypatch, version, match):
    import compressed_tensors

    model, quantized = quantized_tiny("int3-g16")
    if version is None:
        monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails
    else:
        monkeypatch.setattr(compressed_tensors, "__version__", version)
    with pytest.raises(ExportError, match=match):
        save_compressed_tensors(model, quantized, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []
