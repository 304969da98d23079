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

Text is tokenized without special tokens, as one stream. BOS follows each tokenizer's own
convention (`bos_token_id`): when the tokenizer prepends its BOS token to encoded text, every
window the model sees (calibration, training, evaluation) is [BOS] + seq_len - 1 stream tokens,
because a model trained to see BOS first is far from its real quality without it; otherwise
windows are seq_len stream tokens.

A `DataBudget` (n_samples x seq_len, seed) draws n_samples distinct, non-overlapping windows of
seq_len tokens (seq_len - 1 after a BOS) from the tokenized train split: PTQ calibrates on
exactly these blocks and QAFT trains on exactly these blocks, so both see the same unique tokens.
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
           "clean_wiki", "load_text", "tokenize", "bos_token_id", "with_bos", "budget_blocks",
           "validation_blocks"]

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
    text = _read_text_file(path, source)
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) < 2:  # one long paragraph: split on lines instead
        paragraphs = [p for p in text.splitlines() if p.strip()]
    return _split_documents(str(path), paragraphs, heldout_fraction)


def _read_text_file(path: Path, source: str) -> str:
    """The text of a local UTF-8 file, or a DataError saying what is wrong with it and what to do."""
    if path.is_dir():
        raise DataError(f"text source {source!r} is a directory; give a text file in it, or "
                        f"hf:{source} to read a folder of data files as a dataset")
    if not path.is_file():
        raise DataError(f"text source {source!r} is neither 'wiki', 'hf:NAME[:CONFIG]' nor an "
                        "existing file; give the path of a UTF-8 text file, wiki or "
                        "hf:NAME[:CONFIG]")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a leading UTF-8 byte-order mark is not text
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}); convert "
            f"it, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}") from None
    if "\x00" in text:  # valid UTF-8 but binary, or UTF-16 without a byte-order mark
        raise DataError(f"{path} contains NUL bytes: a binary or UTF-16 file, not UTF-8 text; "
                        f"convert it, e.g. iconv -f utf-16 -t utf-8 {path} > "
                        f"{path.stem}.utf8{path.suffix}")
    if not text.strip():
        what = "empty" if not data else "empty (only whitespace)"
        raise DataError(f"{path} is {what}; give a file with text in it")
    return text


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
    """One long 1-D LongTensor of token ids, without special tokens: BOS, where the tokenizer's
    convention wants it, goes at the start of each window (`eval_windows`, `DataBudget.blocks`),
    not at the start of the text."""
    if not text.strip():
        raise DataError("cannot tokenize empty text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


_PROBE_TEXT = "Hello world. The quick brown fox."


def bos_token_id(tokenizer, add_bos: bool | None = None) -> int | None:
    """The BOS id to put first in every window, or None for none.

    add_bos=None follows the tokenizer's own convention: BOS is used when the tokenizer prepends
    its bos_token_id when it encodes text with special tokens (Llama, Gemma, Mistral do; GPT-2,
    Qwen, SmolLM2 do not). True forces BOS (an error if the tokenizer has none), False disables it.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is False:
        return None
    if add_bos is True:
        if bos is None:
            raise DataError(
                f"add_bos=True but the tokenizer {type(tokenizer).__name__} has no bos_token_id; "
                "set tokenizer.bos_token to the token the model was trained to see first, or "
                "leave add_bos unset (None) to follow the tokenizer's convention")
        return int(bos)
    if bos is None:
        return None
    with_special = tokenizer(_PROBE_TEXT, add_special_tokens=True)["input_ids"]
    plain = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    adds = bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)
    return int(bos) if adds else None


def with_bos(content: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(n, k) windows -> (n, k + 1) windows that start with bos_id."""
    return torch.cat([content.new_full((content.shape[0], 1), bos_id), content], dim=1)


@dataclass(frozen=True)
class DataBudget:
    """n_samples windows of seq_len tokens, drawn without overlap from a token stream, seeded.

    With a BOS, each window is [BOS] + seq_len - 1 stream tokens: the model input stays
    n_samples x seq_len, the stream tokens are n_samples * (seq_len - 1).
    """

    n_samples: int
    seq_len: int
    seed: int = 0

    def __post_init__(self):
        if self.n_samples < 1 or self.seq_len < 2:
            raise DataError(f"budget {self.n_samples} x {self.seq_len}: need n_samples >= 1 "
                            "and seq_len >= 2")

    @property
    def unique_tokens(self) -> int:
        """Model input tokens of the blocks, n_samples * seq_len (the BOS of each block included)."""
        return self.n_samples * self.seq_len

    def stream_tokens(self, bos: bool = False) -> int:
        """Distinct tokens of the text the blocks hold: n_samples * (seq_len - 1) with a BOS."""
        return self.n_samples * (self.seq_len - bos)

    def blocks(self, tokens: torch.Tensor, *, bos_id: int | None = None) -> torch.Tensor:
        """(n_samples, seq_len) LongTensor: distinct aligned windows of `tokens`, chosen by seed.

        With bos_id, each block is bos_id followed by one aligned window of seq_len - 1 tokens.
        The same seed, stream and bos_id always give the same blocks, in the same order.
        """
        width = self.seq_len - (bos_id is not None)  # stream tokens per block
        n_windows = tokens.numel() // width
        if n_windows < self.n_samples:
            raise DataError(
                f"budget {self.n_samples} x {self.seq_len} needs "
                f"{self.stream_tokens(bos_id is not None):,} train tokens but the text has "
                f"{tokens.numel():,} ({n_windows} windows); lower --samples or --seq-len, or "
                "give more text")
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(n_windows, generator=g)[: self.n_samples]
        windows = tokens[: n_windows * width].view(n_windows, width)
        if bos_id is None:
            return windows[pick].clone()
        return with_bos(windows[pick], bos_id)

    def validation_blocks(self, tokens: torch.Tensor, n_blocks: int, *,
                          bos_id: int | None = None) -> torch.Tensor:
        """(n_blocks, seq_len) windows of the same train stream that the budget does NOT hold:
        the last n_blocks of the same seeded permutation whose first n_samples are the budget,
        so the two are disjoint by construction. For choosing hyperparameters only (never for
        gradients or Hessians), the same for every method; the held-out text stays untouched."""
        width = self.seq_len - (bos_id is not None)
        n_windows = tokens.numel() // width
        if n_blocks < 1:
            raise DataError(f"a validation slice of {n_blocks} blocks: give at least 1")
        if self.n_samples + n_blocks > n_windows:
            raise DataError(
                f"the train text holds {n_windows} windows of {self.seq_len} tokens: too few for "
                f"the budget ({self.n_samples}) plus a validation slice ({n_blocks}); lower "
                "--samples or the validation blocks, or give more text")
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(n_windows, generator=g)[n_windows - n_blocks:]
        windows = tokens[: n_windows * width].view(n_windows, width)
        return windows[pick].clone() if bos_id is None else with_bos(windows[pick], bos_id)


def validation_blocks(tokenizer, text: TextSplits, budget: DataBudget, n_blocks: int,
                      add_bos: bool | None = None) -> torch.Tensor:
    """The validation slice of `budget` (DataBudget.validation_blocks) from the train split."""
    return budget.validation_blocks(tokenize(tokenizer, text.train), n_blocks,
                                    bos_id=bos_token_id(tokenizer, add_bos))


def budget_blocks(tokenizer, text: TextSplits, budget: DataBudget,
                  add_bos: bool | None = None) -> torch.Tensor:
    """The calibration / training blocks of `budget` from the train split of `text`, with BOS by
    the tokenizer's convention unless add_bos says otherwise (see `bos_token_id`)."""
    return budget.blocks(tokenize(tokenizer, text.train),
                         bos_id=bos_token_id(tokenizer, add_bos))
