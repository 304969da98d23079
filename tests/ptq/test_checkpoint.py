import json

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


@pytest.mark.parametrize("model_type,spec,method", [
    ("llama", "int3-g16", "gptq"), ("llama", "int4-sym-ch", "rtn"), ("gpt2", "e2m1-g16", "gptq"),
    ("opt", "int2-g32", "rtn")])
def test_saved_checkpoint_loads_to_identical_outputs(tmp_path, model_type, spec, method):
    model = tiny_model(model_type, seed=8)
    calib = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    res = ptq.quantize_sequential(model, calib, spec, method, progress=False)
    save_quantized(model, res.quantized, tmp_path / "ckpt")
    loaded, quantized = load_quantized(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, qt in res.quantized.items():
        assert torch.equal(quantized[name].codes, qt.codes)
        assert torch.equal(quantized[name].scale, qt.scale)
    # packed: the codes take bits/32 of the fp32 weights' bytes, plus scales
    size = (tmp_path / "ckpt" / CHECKPOINT_FILE).stat().st_size
    fp_size = sum(p.numel() * 4 for p in model.parameters())
    assert size < fp_size


def test_tied_embeddings_survive_and_load_model_reads_checkpoints(tmp_path):
    model = tiny_model("llama", seed=9, tie_word_embeddings=True)
    res = ptq.quantize_model(model, "int4-g32", progress=False, keep_codes=True)
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
