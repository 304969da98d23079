import pytest
import torch

from compare.data import DataBudget, DataError, clean_wiki, load_text, tokenize


def test_clean_wiki_strips_leftover_markup():
    raw = "'''Aikido''' is ''a'' martial art.\n\n\n\n==History==\n* \n*  Item one\n;\n\nEnd."
    assert clean_wiki(raw) == "Aikido is a martial art.\n\nHistory\n\n*  Item one\n\nEnd."


def test_budget_is_deterministic_disjoint_and_seeded():
    tokens = torch.arange(10_000)
    a = DataBudget(16, 64, seed=3).blocks(tokens)
    assert a.shape == (16, 64)
    assert torch.equal(a, DataBudget(16, 64, seed=3).blocks(tokens))
    assert not torch.equal(a, DataBudget(16, 64, seed=4).blocks(tokens))
    assert a.unique().numel() == 16 * 64 == DataBudget(16, 64).unique_tokens  # no overlap
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 63, dtype=torch.long))  # contiguous


def test_budget_larger_than_text_is_a_clear_error():
    with pytest.raises(DataError, match=r"needs 131,072 train tokens but the text has 10,000"):
        DataBudget(128, 1024).blocks(torch.arange(10_000))
    with pytest.raises(DataError, match="seq_len >= 2"):
        DataBudget(4, 1)


def test_local_text_file_splits_deterministically_at_paragraphs(text_file):
    a, b = load_text(str(text_file)), load_text(str(text_file))
    assert a == b
    paragraphs = text_file.read_text().split("\n\n")
    assert a.train.split("\n\n") + a.heldout.split("\n\n") == paragraphs  # disjoint, complete
    assert 0.08 < len(a.heldout) / (len(a.train) + len(a.heldout)) < 0.2


def test_empty_or_missing_text_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(DataError, match="empty"):
        load_text(str(empty))
    with pytest.raises(DataError, match="neither 'wiki'"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="hf:NAME"):
        load_text("hf:")


def test_hf_dataset_path_on_a_local_folder(tmp_path, text_file):
    # the same code path that loads hf:wikitext online, pointed at local data files
    folder = tmp_path / "ds"
    folder.mkdir()
    paragraphs = text_file.read_text().split("\n\n")
    (folder / "train.txt").write_text("\n".join(paragraphs[:50]))
    (folder / "test.txt").write_text("\n".join(paragraphs[50:]))
    splits = load_text(f"hf:{folder}")
    assert splits.train.split("\n") == paragraphs[:50]
    assert splits.heldout.split("\n") == paragraphs[50:]


def test_tokenize_rejects_empty_text():
    with pytest.raises(DataError, match="empty"):
        tokenize(None, "   ")


@pytest.mark.real
def test_embedded_wiki_is_split_by_article():
    pytest.importorskip("gensim")
    from compare.data import wiki_articles

    articles = wiki_articles()
    assert len(articles) > 90
    assert not any(t.lstrip().upper().startswith("#REDIRECT") for _, t in articles)
    assert not any("'''" in t for _, t in articles)
    splits = load_text("wiki")
    texts = [t for _, t in articles]
    k = len(splits.train.split("\n\n"))  # articles are joined with a blank line
    assert splits.train.startswith(texts[0]) and splits.heldout.endswith(texts[-1])
    assert 0.09 < len(splits.heldout) / (len(splits.train) + len(splits.heldout)) < 0.2
    assert k > len(texts)  # paragraphs inside articles also have blank lines
