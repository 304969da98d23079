"""Text and data budgets: where calibration, fine-tuning and evaluation tokens come from.

Sources (`load_text`):
  "wiki"              the embedded default: the ~200 Wikipedia pages of gensim's test data,
                      markup stripped with gensim's `filter_wiki`, redirects dropped;
  a file path         a local UTF-8 text file;
  "hf:NAME[:CONFIG]"  a Hugging Face dataset (hub id, or a local folder of data files), using
                      its "text" column; network access for hub ids.
Every source is split deterministically into a train split and a held-out split: by article for
the wiki text and datasets without a test split (the last articles holding `heldout_fraction` of
the characters are held out), at a paragraph boundary for a plain file.

A `DataBudget` (n_samples x seq_len, seed) draws n_samples distinct, non-overlapping windows of
seq_len tokens from the tokenized train split: PTQ calibrates on exactly these blocks and QAFT
trains on exactly these blocks, so both see the same n_samples * seq_len unique tokens.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ptq.errors import QalignError


__all__ = ["DataError", "TextSplits", "DataBudget", "EMBEDDED_WIKI", "wiki_articles",
           "clean_wiki", "load_text", "tokenize"]

EMBEDDED_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_HELDOUT_FRACTION = 0.1
MIN_ARTICLE_CHARS = 200


class DataError(QalignError):
    """Text that is missing, empty or too short for what was asked of it."""


@dataclass(frozen=True)
class TextSplits:
    name: str
    train: str
    heldout: str


def _embedded_wiki_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded Wikipedia text ships inside gensim's test data: "
                        "pip install gensim (or pip install 'qalign[embedded]')")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_WIKI
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed gensim; reinstall gensim")
    return path


_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$")


def clean_wiki(text: str) -> str:
    """Plain text from `filter_wiki` output: drop bold/italic quotes, unwrap headings, remove
    empty list items, collapse runs of blank lines."""
    lines = []
    for line in text.replace("'''", "").replace("''", "").splitlines():
        line = _HEADING.sub(r"\1", line.strip())
        if line.strip("*;:# ") == "":
            line = ""
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()


def wiki_articles() -> list[tuple[str, str]]:
    """(title, plain text) of the embedded Wikipedia pages, in file order, redirects and pages
    shorter than MIN_ARTICLE_CHARS dropped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_embedded_wiki_path()) as f:
        for title, markup, _pageid in extract_pages(f):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wiki(filter_wiki(markup))
            if len(text) >= MIN_ARTICLE_CHARS:
                articles.append((title, text))
    return articles


def _split_documents(name: str, docs: list[str], heldout_fraction: float) -> TextSplits:
    """Hold out the last documents that together reach heldout_fraction of the characters."""
    if len(docs) < 2:
        raise DataError(f"{name}: need at least 2 documents to split train/held-out, got "
                        f"{len(docs)}")
    total = sum(len(d) for d in docs)
    k, tail = len(docs), 0
    while k > 1 and tail < heldout_fraction * total:
        k -= 1
        tail += len(docs[k])
    return TextSplits(name, "\n\n".join(docs[:k]), "\n\n".join(docs[k:]))


def load_text(source: str = "wiki", *, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
              ) -> TextSplits:
    """Train and held-out text of a source (see module docstring)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
    if source == "wiki":
        return _split_documents("wiki", [t for _, t in wiki_articles()], heldout_fraction)
    if source.startswith("hf:"):
        return _load_hf(source, heldout_fraction)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"text source {source!r} is neither 'wiki', 'hf:NAME[:CONFIG]' nor an "
                        "existing file")
    text = path.read_text(encoding="utf-8")
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        raise DataError(f"{path} is empty; give a file with text in it")
    if len(paragraphs) < 2:  # one long paragraph: split on lines instead
        paragraphs = [p for p in text.splitlines() if p.strip()]
    return _split_documents(str(path), paragraphs, heldout_fraction)


def _load_hf(source: str, heldout_fraction: float) -> TextSplits:
    import datasets

    _, _, rest = source.partition(":")
    name, _, config = rest.partition(":")
    if not name:
        raise DataError(f"{source!r}: write hf:NAME or hf:NAME:CONFIG, e.g. "
                        "hf:wikitext:wikitext-2-raw-v1")
    ds = datasets.load_dataset(name, config or None)
    if "text" not in ds[next(iter(ds))].column_names:
        raise DataError(f"{source}: no 'text' column (columns: "
                        f"{ds[next(iter(ds))].column_names})")
    held = next((s for s in ("test", "validation") if s in ds), None)
    if "train" in ds and held is not None:
        def join(split):
            return "\n".join(t for t in ds[split]["text"] if t is not None)
        return TextSplits(source, join("train"), join(held))
    docs = [t for split in ds for t in ds[split]["text"] if t and t.strip()]
    return _split_documents(source, docs, heldout_fraction)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D LongTensor of token ids, without special tokens."""
    if not text.strip():
        raise DataError("cannot tokenize empty text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class DataBudget:
    """n_samples windows of seq_len tokens, drawn without overlap from a token stream, seeded."""

    n_samples: int
    seq_len: int
    seed: int = 0

    def __post_init__(self):
        if self.n_samples < 1 or self.seq_len < 2:
            raise DataError(f"budget {self.n_samples} x {self.seq_len}: need n_samples >= 1 "
                            "and seq_len >= 2")

    @property
    def unique_tokens(self) -> int:
        return self.n_samples * self.seq_len

    def blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n_samples, seq_len) LongTensor: distinct aligned windows of `tokens`, chosen by seed.

        The same seed and stream always give the same blocks, in the same order.
        """
        n_windows = tokens.numel() // self.seq_len
        if n_windows < self.n_samples:
            raise DataError(
                f"budget {self.n_samples} x {self.seq_len} needs {self.unique_tokens:,} train "
                f"tokens but the text has {tokens.numel():,} ({n_windows} windows); lower "
                "--samples or --seq-len, or give more text")
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(n_windows, generator=g)[: self.n_samples]
        windows = tokens[: n_windows * self.seq_len].view(n_windows, self.seq_len)
        return windows[pick].clone()
