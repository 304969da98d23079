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
    from recipes.common import heldout_windows

    model, tokenizer = smollm2
    windows = heldout_windows(tokenizer, "wiki", 512, 2048)
    res = evaluate_nll(model, windows, progress=False)
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
