"""BOS by each tokenizer's convention, and the toolkit's NLL against a plain transformers loop.

The plain loop builds the windows by hand from the tokenizer's own encoding, calls
`model(input_ids=w, labels=w).loss` per window and averages: the toolkit must agree with it to
float32 rounding, with and without BOS.
"""

import pytest
import torch

from compare.data import (DataBudget, DataError, TextSplits, bos_token_id, budget_blocks,
                          load_text, tokenize)
from compare.evaluate import eval_windows, evaluate_nll, heldout_windows
from compare.models import tiny_model


def bpe_tokenizer(texts: list[str], *, adds_bos: bool, bos_token: str | None = "<s>"):
    """A small byte-level BPE tokenizer; with adds_bos its post-processor is "<s> $A", the way
    Llama-style tokenizers prepend BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token="<eos>")


@pytest.fixture
def corpus(text_file) -> str:
    return text_file.read_text()


@pytest.fixture
def tokenizers(corpus):
    paragraphs = corpus.split("\n\n")
    return {"bos": bpe_tokenizer(paragraphs, adds_bos=True),
            "no-bos": bpe_tokenizer(paragraphs, adds_bos=False)}


def plain_loop_nll(model, tokenizer, text: str, seq_len: int, max_tokens: int,
                   bos_id: int | None):
    """Mean of transformers' `labels=` loss over windows built by hand: [bos_id] + seq_len - 1
    tokens of the encoded text, or seq_len tokens without bos_id."""
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = [] if bos_id is None else [bos_id]
    width = seq_len - len(head)
    n = min(len(stream) // width, max_tokens // seq_len)
    windows = torch.tensor([head + stream[i * width:(i + 1) * width] for i in range(n)])
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    return float(torch.stack(losses).double().mean()), windows


def test_bos_follows_the_tokenizers_convention(tokenizers, corpus):
    bos_tok, plain_tok = tokenizers["bos"], tokenizers["no-bos"]
    s = bos_tok.bos_token_id
    assert s == plain_tok.bos_token_id == bos_tok.convert_tokens_to_ids("<s>")
    assert bos_tok("a fox")["input_ids"][0] == s != bos_tok("a fox", add_special_tokens=False)[
        "input_ids"][0]
    assert bos_token_id(bos_tok) == s and bos_token_id(bos_tok, add_bos=False) is None
    # a bos_token that the tokenizer does not prepend (SmolLM2, GPT-2) is not used unless forced
    assert bos_token_id(plain_tok) is None and bos_token_id(plain_tok, add_bos=True) == s
    # tokenize never adds it: the stream is the same for both conventions
    assert torch.equal(tokenize(bos_tok, corpus), tokenize(plain_tok, corpus))


def test_forcing_bos_without_one_is_a_clear_error(corpus):
    tok = bpe_tokenizer(corpus.split("\n\n"), adds_bos=False, bos_token=None)
    assert tok.bos_token_id is None and bos_token_id(tok) is None
    with pytest.raises(DataError, match="add_bos=True but the tokenizer .* has no bos_token_id; "
                                        "set tokenizer.bos_token"):
        bos_token_id(tok, add_bos=True)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("convention", ["bos", "no-bos"])
def test_nll_equals_a_plain_transformers_loop(model_type, convention, tokenizers, corpus):
    tok = tokenizers[convention]
    model = tiny_model(model_type, vocab_size=len(tok), seed=1)
    L, M = 32, 320
    bos_id = bos_token_id(tok)
    assert (bos_id is not None) == (convention == "bos")
    windows = eval_windows(tokenize(tok, corpus), L, M, bos_id=bos_id)
    res = evaluate_nll(model, windows, batch_size=3, progress=False, bos_id=bos_id)
    ref, hand = plain_loop_nll(model, tok, corpus, L, M, bos_id)
    assert torch.equal(windows, hand)
    # the first window is what the tokenizer itself gives the model for the start of the text
    assert windows[0].tolist() == tok(corpus)["input_ids"][:L]
    assert res.nll == pytest.approx(ref, rel=1e-6)  # float32 rounding only (~3e-8 seen)
    assert res.n_windows == M // L == 10 and res.scored_tokens == 10 * (L - 1)
    assert res.bos == (convention == "bos")
    if bos_id is not None:
        # the first window starts with BOS; the second continues the stream where it stopped
        stream = tokenize(tok, corpus)
        assert windows[0, 0] == windows[1, 0] == bos_id
        assert torch.equal(torch.cat([windows[0, 1:], windows[1, 1:]]), stream[: 2 * (L - 1)])
        # and BOS matters: the same stream without it is a different measurement
        no_bos = evaluate_nll(model, eval_windows(stream, L, M), progress=False)
        assert abs(no_bos.nll - res.nll) > 1e-4


def test_one_line_helpers_follow_the_convention(tokenizers, corpus):
    paragraphs = corpus.split("\n\n")
    text = TextSplits("t", "\n\n".join(paragraphs[:50]), "\n\n".join(paragraphs[50:]))
    budget = DataBudget(8, 16, seed=2)
    for tok in tokenizers.values():
        bos_id = bos_token_id(tok)
        windows, got = heldout_windows(tok, text, 16, 128)
        assert got == bos_id
        assert torch.equal(windows, eval_windows(tokenize(tok, text.heldout), 16, 128,
                                                 bos_id=bos_id))
        assert torch.equal(budget_blocks(tok, text, budget),
                           budget.blocks(tokenize(tok, text.train), bos_id=bos_id))
    tok = tokenizers["bos"]
    assert heldout_windows(tok, text, 16, 128, add_bos=False)[1] is None
    assert torch.equal(budget_blocks(tok, text, budget, add_bos=False),
                       budget.blocks(tokenize(tok, text.train)))
    assert bool((budget_blocks(tok, text, budget)[:, 0] == tok.bos_token_id).all())


@pytest.mark.real
def test_smollm2_nll_equals_a_plain_transformers_loop(smollm2):
    model, tok = smollm2
    # SmolLM2's tokenizer (GGUF add_bos_token=False) does not prepend its bos_token <|im_start|>
    assert tok.bos_token == "<|im_start|>" and bos_token_id(tok) is None
    text = load_text("wiki").heldout[:20_000]
    for add_bos in (None, True):
        bos_id = bos_token_id(tok, add_bos)
        windows = eval_windows(tokenize(tok, text), 128, 512, bos_id=bos_id)
        res = evaluate_nll(model, windows, progress=False, bos_id=bos_id)
        ref, hand = plain_loop_nll(model, tok, text, 128, 512, bos_id)
        assert torch.equal(windows, hand) and res.n_windows == 4
        assert res.nll == pytest.approx(ref, rel=1e-5)
