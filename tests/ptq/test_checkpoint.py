import json
import struct

import pytest
import torch

import ptq
from compare.models import load_model, tiny_model
from ptq.checkpoint import (CHECKPOINT_FILE, load_quantized, pack_bits, save_quantized,
                            unpack_bits)


@pytest.mark.parametrize("bits,signed", [(2, False), (3, False), (3, True), (4, True), (5, False),
                                         (8, False), (16, False)])
def test_pack_unpack_round_trip(bits, signed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    codes = torch.randint(lo, hi, (13, 7), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, codes.numel(), signed).view(13, 7), codes)


def header(path) -> tuple[int, dict]:
    """(length, JSON) of a safetensors header: 8 bytes little-endian length, then the JSON."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


@pytest.mark.parametrize("model_type,spec,method", [
    ("llama", "int3-g16", "gptq"), ("llama", "int4-sym-ch", "rtn"), ("gpt2", "e2m1-g16", "gptq"),
    ("opt", "int2-g32", "rtn")])
def test_saved_checkpoint_loads_to_identical_outputs(tmp_path, model_type, spec, method):
    model = tiny_model(model_type, seed=8)
    calib = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    res = ptq.quantize_model(model, spec, method, calib=calib, progress=False)
    save_quantized(model, res.quantized, tmp_path / "ckpt")
    loaded, quantized = load_quantized(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert quantized.keys() == res.quantized.keys()
    for name, qt in res.quantized.items():
        assert torch.equal(quantized[name].codes, qt.codes)
        assert quantized[name].codes.dtype == qt.codes.dtype
        assert torch.equal(quantized[name].scale, qt.scale)
        if qt.zero is not None:
            assert torch.equal(quantized[name].zero, qt.zero)


@pytest.mark.parametrize("spec", ["int3-g16", "int4-sym-ch", "e2m1-g32", "int2-t"])
def test_file_size_is_the_packed_size_plus_the_header(tmp_path, spec):
    model = tiny_model("llama", seed=3)
    res = ptq.quantize_model(model, spec, "rtn", progress=False)
    path = save_quantized(model, res.quantized, tmp_path / "c") / CHECKPOINT_FILE
    bits = ptq.parse_spec(spec).bits
    # what the file must hold: every plain tensor at its dtype's size, each layer's codes at
    # `bits` bits each (not a byte, not an int64), its scales and (asymmetric) zero points
    plain = {k: t for k, t in model.state_dict().items()
             if k.removesuffix(".weight") not in res.quantized}
    want = sum(t.numel() * t.element_size() for t in plain.values())
    for qt in res.quantized.values():
        want += (qt.codes.numel() * bits + 7) // 8 + qt.scale.numel() * qt.scale.element_size()
        want += 0 if qt.zero is None else qt.zero.numel()
    n_header, head = header(path)
    assert path.stat().st_size == 8 + n_header + want
    # the header is names, shapes, offsets and the metadata (two sha256 per tensor at most)
    meta_chars = sum(len(v) for v in head["__metadata__"].values())
    assert n_header < meta_chars + 160 * (len(head) - 1)
    for name, qt in res.quantized.items():
        entry = head[f"{name}.qcodes"]
        assert entry["dtype"] == "U8" and entry["shape"] == [(qt.codes.numel() * bits + 7) // 8]
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values())
    assert path.stat().st_size < fp32  # a smoke check on top of the exact one above


def test_tied_embeddings_survive_and_load_model_reads_checkpoints(tmp_path):
    model = tiny_model("llama", seed=9, tie_word_embeddings=True)
    res = ptq.quantize_model(model, "int4-g32", progress=False)
    save_quantized(model, res.quantized, tmp_path / "c")
    loaded, _ = load_model(str(tmp_path / "c"), with_tokenizer=False)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    from safetensors import safe_open
    with safe_open(tmp_path / "c" / CHECKPOINT_FILE, framework="pt") as f:
        meta = json.loads(f.metadata()["qalign"])
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert meta["layers"]["model.layers.0.mlp.down_proj"]["spec"] == "int4-g32"
