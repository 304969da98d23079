import pytest
import torch

from compare.data import DataBudget, DataError, clean_wiki, load_text, tokenize


def blocks_before_bos(budget: DataBudget, tokens: torch.Tensor) -> torch.Tensor:
    """`DataBudget.blocks` as it was before BOS support: bos_id=None must still give exactly this."""
    n_windows = tokens.numel() // budget.seq_len
    pick = torch.randperm(n_windows, generator=torch.Generator().manual_seed(budget.seed))
    windows = tokens[: n_windows * budget.seq_len].view(n_windows, budget.seq_len)
    return windows[pick[: budget.n_samples]].clone()


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


@pytest.mark.parametrize("n, L, seed, size", [(16, 64, 0, 10_000), (5, 7, 3, 999), (1, 2, 9, 5)])
def test_budget_without_bos_is_unchanged(n, L, seed, size):
    tokens = torch.randint(0, 50_000, (size,), generator=torch.Generator().manual_seed(seed))
    budget = DataBudget(n, L, seed=seed)
    assert torch.equal(budget.blocks(tokens), blocks_before_bos(budget, tokens))
    assert torch.equal(budget.blocks(tokens, bos_id=None), blocks_before_bos(budget, tokens))


def test_budget_with_bos_prepends_it_to_disjoint_aligned_windows():
    tokens = torch.arange(1, 10_001)  # 0 is free for the BOS
    budget = DataBudget(16, 64, seed=3)
    a = budget.blocks(tokens, bos_id=0)
    assert a.shape == (16, 64) and bool((a[:, 0] == 0).all())
    assert torch.equal(a, budget.blocks(tokens, bos_id=0))
    assert not torch.equal(a, DataBudget(16, 64, seed=4).blocks(tokens, bos_id=0))
    content = a[:, 1:]
    assert content.unique().numel() == 16 * 63 == budget.stream_tokens(bos=True)  # no overlap
    assert torch.equal(content[:, 1:] - content[:, :-1], torch.ones(16, 62, dtype=torch.long))
    assert bool(((content[:, 0] - 1) % 63 == 0).all())  # aligned windows of seq_len - 1 tokens
    assert budget.unique_tokens == 16 * 64 and budget.stream_tokens() == 16 * 64


def test_budget_with_bos_needs_seq_len_minus_one_tokens_per_block():
    assert DataBudget(4, 8).blocks(torch.arange(28), bos_id=0).shape == (4, 8)  # 4 x 7 tokens
    with pytest.raises(DataError, match=r"needs 28 train tokens but the text has 27 \(3 windows"):
        DataBudget(4, 8).blocks(torch.arange(27), bos_id=0)


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


def test_text_that_is_not_usable_utf8_names_the_file_and_the_fix(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 au lait.\n\nUne cr\u00e8me br\u00fbl\u00e9e.".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(byte 3 .*iconv -f latin1"):
        load_text(str(latin1))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("One paragraph.\n\nAnother one.", encoding="utf-16")  # with a byte-order mark
    with pytest.raises(DataError, match=r"utf16\.txt is not UTF-8 text.*iconv"):
        load_text(str(utf16))
    utf16le = tmp_path / "utf16le.txt"
    utf16le.write_text("One paragraph.\n\nAnother one.", encoding="utf-16-le")  # decodes as UTF-8
    with pytest.raises(DataError, match=r"utf16le\.txt contains NUL bytes.*iconv -f utf-16"):
        load_text(str(utf16le))


def test_directory_empty_and_blank_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"is a directory; give a text file in it, or hf:"):
        load_text(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.txt is empty; give a file with text"):
        load_text(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n\n  \n")
    with pytest.raises(DataError, match=r"blank\.txt is empty \(only whitespace\); give a file"):
        load_text(str(blank))


def test_utf8_byte_order_mark_is_not_text(tmp_path, text_file):
    marked = tmp_path / "marked.txt"
    marked.write_bytes(b"\xef\xbb\xbf" + text_file.read_bytes())
    a, b = load_text(str(marked)), load_text(str(text_file))
    assert (a.train, a.heldout) == (b.train, b.heldout)


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


def test_validation_slice_is_disjoint_from_the_budget_and_the_heldout_text():
    from compare.data import DataBudget

    stream = torch.arange(10_000)  # every token id unique: overlap shows as shared ids
    heldout = torch.arange(10_000, 12_000)
    for bos in (None, 99_999):
        budget = DataBudget(20, 64, seed=3)
        train = budget.blocks(stream, bos_id=bos)
        val = budget.validation_blocks(stream, 8, bos_id=bos)
        assert val.shape == (8, 64)
        body = slice(1, None) if bos is not None else slice(None)
        t, v = set(train[:, body].flatten().tolist()), set(val[:, body].flatten().tolist())
        assert not t & v and not v & set(heldout.tolist())
        # the budget itself is unchanged by asking for a validation slice
        assert torch.equal(budget.blocks(stream, bos_id=bos), train)
    with pytest.raises(DataError, match="validation slice"):
        DataBudget(150, 64).validation_blocks(stream, 10)
