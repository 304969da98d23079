import json
import math

import pytest
import torch

from compare.data import DataError
from compare.evaluate import eval_windows, evaluate_nll, token_nll
from compare.models import tiny_model


def test_windows_are_non_overlapping_and_capped():
    tokens = torch.arange(1000)
    w = eval_windows(tokens, 64, max_tokens=300)
    assert w.shape == (4, 64) and torch.equal(w.flatten(), torch.arange(256))
    assert eval_windows(tokens, 64).shape == (15, 64)
    with pytest.raises(DataError, match="not one window"):
        eval_windows(torch.arange(10), 64)


@pytest.mark.parametrize("size, L, max_tokens", [(1000, 64, 300), (1000, 64, None), (513, 2, 77),
                                                 (4096, 512, 2048), (4095, 512, None)])
def test_windows_without_bos_are_unchanged(size, L, max_tokens):
    # the protocol behind the README figures: no BOS gives exactly the windows it always gave
    tokens = torch.randint(0, 50_000, (size,), generator=torch.Generator().manual_seed(size))
    n = tokens.numel() // L if max_tokens is None else min(tokens.numel() // L, max_tokens // L)
    expected = tokens[: n * L].view(n, L)
    assert torch.equal(eval_windows(tokens, L, max_tokens), expected)
    assert torch.equal(eval_windows(tokens, L, max_tokens, bos_id=None), expected)


def test_windows_with_bos_hold_seq_len_minus_one_stream_tokens_each():
    tokens = torch.arange(1, 1001)  # 0 is free for the BOS
    w = eval_windows(tokens, 64, max_tokens=300, bos_id=0)
    # max_tokens caps the model input (BOS included): the same 4 windows as without BOS
    assert w.shape == (4, 64) and bool((w[:, 0] == 0).all())
    assert torch.equal(w[:, 1:].flatten(), torch.arange(1, 1 + 4 * 63))  # contiguous, disjoint
    assert eval_windows(tokens, 64, bos_id=0).shape == (15, 64)  # 1000 // 63 = 15
    assert eval_windows(torch.arange(1, 127), 64, bos_id=0).shape == (2, 64)  # 126 = 2 x 63
    with pytest.raises(DataError, match="not one window of BOS \\+ 63 tokens"):
        eval_windows(torch.arange(62), 64, bos_id=0)
    with pytest.raises(DataError, match="not one window"):
        eval_windows(tokens, 64, max_tokens=63, bos_id=0)


def test_bos_is_recorded_and_checked():
    model = tiny_model("llama", seed=2)
    tokens = torch.randint(1, 256, (200,), generator=torch.Generator().manual_seed(0))
    plain = evaluate_nll(model, eval_windows(tokens, 32), progress=False)
    windows = eval_windows(tokens, 32, bos_id=0)
    res = evaluate_nll(model, windows, progress=False, bos_id=0)
    assert res.bos and not plain.bos and res.to_dict()["bos"] is True
    assert res.scored_tokens == plain.scored_tokens == 6 * 31  # the BOS is never a target
    with pytest.raises(ValueError, match="not every window starts with it"):
        evaluate_nll(model, eval_windows(tokens, 32), progress=False, bos_id=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_nll_matches_transformers_labels_loss(model_type):
    model = tiny_model(model_type, seed=2)
    windows = torch.randint(0, 256, (5, 48), generator=torch.Generator().manual_seed(0))
    res = evaluate_nll(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        ref = torch.stack([model(input_ids=w[None], labels=w[None]).loss for w in windows]).mean()
    assert res.nll == pytest.approx(float(ref), rel=1e-4)
    assert res.perplexity == pytest.approx(math.exp(res.nll))
    assert res.scored_tokens == 5 * 47 and res.n_windows == 5


def test_token_nll_of_a_certain_prediction_is_zero():
    ids = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 1e4
    assert torch.allclose(token_nll(logits, ids), torch.zeros(1, 2))


@pytest.mark.real
def test_smollm2_heldout_perplexity_and_agreement(smollm2):
    from compare.data import load_text
    from compare.evaluate import heldout_windows

    model, tokenizer = smollm2
    windows, bos_id = heldout_windows(tokenizer, load_text("wiki"), 512, 2048)
    assert bos_id is None  # SmolLM2's tokenizer does not prepend its BOS: README protocol as is
    res = evaluate_nll(model, windows, progress=False, bos_id=bos_id)
    with torch.no_grad():
        ref = torch.stack([model(input_ids=w[None], labels=w[None]).loss for w in windows]).mean()
    assert res.nll == pytest.approx(float(ref), rel=1e-4)
    assert 10 < res.perplexity < 60  # the full 16k-token protocol gives about 27


def test_kl_against_reference_logprobs():
    from compare.evaluate import reference_logprobs

    fp = tiny_model("llama", seed=2)
    other = tiny_model("llama", seed=3)
    windows = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    ref = reference_logprobs(fp, windows, batch_size=2, progress=False)
    assert evaluate_nll(fp, windows, reference=ref, progress=False).kl == pytest.approx(0, abs=1e-6)
    res = evaluate_nll(other, windows, batch_size=2, reference=ref, progress=False)
    with torch.no_grad():
        logq = torch.log_softmax(other(input_ids=windows).logits[:, :-1].float(), -1)
    expected = torch.nn.functional.kl_div(logq, ref, log_target=True, reduction="sum") / (3 * 31)
    assert res.kl == pytest.approx(float(expected), rel=1e-4) and res.kl > 0
    with pytest.raises(ValueError, match="do not match"):
        evaluate_nll(other, windows[:2], reference=ref, progress=False)


def test_window_nll_averaged_with_token_weights_is_the_nll():
    model = tiny_model("llama", seed=2)
    windows = torch.randint(0, 256, (7, 40), generator=torch.Generator().manual_seed(3))
    res = evaluate_nll(model, windows, batch_size=3, progress=False)  # a short last batch
    assert len(res.window_nll) == res.n_windows == 7
    tokens = [39] * 7  # every window scores seq_len - 1 tokens
    weighted = math.fsum(w * t for w, t in zip(res.window_nll, tokens)) / sum(tokens)
    assert weighted == pytest.approx(res.nll, rel=1e-14, abs=0)
    # the overall NLL is still total / count over all tokens, summed batch by batch as before
    with torch.no_grad():
        total = sum(float(token_nll(model(input_ids=b).logits, b).double().sum())
                    for b in windows.split(3))
    assert res.nll == total / (7 * 39)
    with torch.no_grad():  # each window's entry is its own labels= loss, in window order
        own = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert res.window_nll == pytest.approx(own, rel=1e-5)
    assert json.loads(json.dumps(res.to_dict()))["window_nll"] == list(res.window_nll)
