import pytest
import torch

import qaft
from compare.models import tiny_model
from qaft.train import TrainConfig, finetune, lr_factor


def blocks(n=8, L=24, seed=0):
    # a learnable stream: repeating short patterns
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 64, (6,), generator=g)
    return base.repeat(n * L // 6 + 1)[: n * L].view(n, L)


def test_schedules():
    c = TrainConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, 10, c) == 0.5 and lr_factor(1, 10, c) == 1.0
    assert lr_factor(9, 10, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(
        torch.tensor(7 / 8 * torch.pi)).item()))
    w = TrainConfig(schedule="wsd", decay_fraction=0.5)
    assert [round(lr_factor(s, 4, w), 3) for s in range(4)] == [1.0, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear-ish")


def test_qaft_lowers_the_loss_and_records_everything():
    model = tiny_model("llama", seed=0)
    qaft.prepare(model, "int4-g16")
    data = blocks()
    X = {name: torch.randn(32, fq.linear.in_features) for name, fq
         in qaft.fake_quant_layers(model).items()}
    res = finetune(model, data, TrainConfig(lr=3e-3, epochs=3, batch_size=2, local_every=2,
                                            eval_every=3), local_inputs=X,
                   eval_fn=lambda m: 1.23, progress=False)
    h = res.history
    assert res.steps == 12 and len(h) == 12
    assert h[-1]["loss"] < 0.5 * h[0]["loss"]
    assert h[-1]["tokens_processed"] == 3 * 8 * 24 and res.unique_tokens == 8 * 24
    assert h[1]["unique_tokens"] == 4 * 24  # unique tokens grow within the first epoch only
    assert "local" in h[1] and len(h[1]["local"]) == 14 and "local" not in h[0]
    assert all(0 <= v < 1 for v in h[1]["local"].values())
    assert h[2]["eval_nll"] == 1.23
    assert [r["seconds"] for r in h] == sorted(r["seconds"] for r in h)


def test_same_seed_same_numbers_and_grad_accum_matches_larger_batch():
    def run(**kw):
        model = tiny_model("llama", seed=1)
        qaft.prepare(model, "int3-g16")
        return finetune(model, blocks(seed=2), TrainConfig(lr=1e-3, **kw), progress=False), model

    (a, ma), (b, mb) = run(batch_size=2), run(batch_size=2)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert all(torch.equal(x, y) for x, y in zip(ma.parameters(), mb.parameters()))
    _, mc = run(batch_size=1, grad_accum=2)
    # two micro-batches of 1 accumulate to the gradient of one batch of 2
    for x, y in zip(ma.parameters(), mc.parameters()):
        assert torch.allclose(x, y, atol=1e-5)


def test_too_small_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        finetune(tiny_model("llama"), blocks(n=2), TrainConfig(batch_size=4), progress=False)
