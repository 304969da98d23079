"""WSD cooldown branches from saved checkpoints, exact schedule values, fp16 on a CPU."""

import pytest
import torch

from compare.models import tiny_model
from ptq.errors import OptionsError
from qaft.checkpoints import checkpoint_meta, checkpoint_steps
from qaft.schedules import first_lr_difference, lr_factor
from qaft.train import TrainConfig, finetune

BASE = dict(lr=3e-3, batch_size=2, warmup_steps=2, weight_decay=0.1, seed=1, keep_checkpoints=10)


def data():
    return torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(5))


def train(config, directory, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny_model("llama", seed=2, attention_dropout=0.2)  # dropout draws from the RNG
        result = finetune(model, data(), config, checkpoint_dir=directory, progress=False, **kw)
    return result, model


def test_wsd_with_decay_steps_has_exact_values():
    c = TrainConfig(schedule="wsd", warmup_steps=2, decay_steps=3, min_lr_ratio=0.1)
    got = [lr_factor(s, 10, c) for s in range(10)]
    assert got[:7] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert got[7:] == pytest.approx([0.1 + 0.9 * 2 / 3, 0.1 + 0.9 / 3, 0.1], abs=1e-12)
    assert got[-1] == 0.1  # the last step reaches the floor exactly
    # a cooldown branch at step 6 of a constant run agrees with it before 6, not at 6 or later
    parent = TrainConfig(warmup_steps=2)
    branch = TrainConfig(schedule="wsd", warmup_steps=2, decay_steps=3, max_steps=9)
    assert first_lr_difference(parent, 100, branch, 9, 6) is None
    assert first_lr_difference(parent, 100, branch, 9, 7) == 6


def test_a_cooldown_branch_equals_the_straight_wsd_run(tmp_path):
    parent = TrainConfig(**BASE, max_steps=8, checkpoint_every=2)
    train(parent, tmp_path / "stable")
    assert checkpoint_steps(tmp_path / "stable") == [2, 4, 6, 8]
    cooldown = TrainConfig(**BASE, schedule="wsd", decay_steps=3, max_steps=7)
    res, branched = train(cooldown, tmp_path / "cooldown",
                          branch_from=tmp_path / "stable" / "step-000004")
    straight_res, straight = train(cooldown, tmp_path / "straight")
    assert res.resumed_from == 4 and res.steps == 7
    for (name, a), b in zip(branched.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name
    # the branch's history is the parent's first 4 rows, then its own decaying rates
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in res.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"}
                     for r in straight_res.history]
    assert [r["lr"] for r in res.history[4:]] == pytest.approx([3e-3 * 2 / 3, 3e-3 / 3, 0.0])
    meta = checkpoint_meta(tmp_path / "cooldown" / "step-000007")
    assert meta["branched_from"].endswith("step-000004")


def test_a_branch_is_refused_when_it_cannot_continue_its_parent(tmp_path):
    train(TrainConfig(**BASE, max_steps=4, checkpoint_every=2), tmp_path / "stable")
    point = tmp_path / "stable" / "step-000004"
    cases = [
        (TrainConfig(**BASE, schedule="wsd", decay_steps=2, max_steps=4), "at or after the end"),
        (TrainConfig(**BASE, schedule="cosine", max_steps=8), "learning rate at step 3 differs"),
        (TrainConfig(**{**BASE, "lr": 1e-3}, schedule="wsd", decay_steps=2, max_steps=6),
         "lr: 0.003 there"),
    ]
    for config, match in cases:
        with pytest.raises(OptionsError, match=match):
            train(config, tmp_path / "branch", branch_from=point)
    with pytest.raises(OptionsError, match="not a training checkpoint"):
        train(TrainConfig(**BASE, max_steps=6), tmp_path / "b2", branch_from=tmp_path)


def test_fp16_autocast_runs_on_a_cpu_with_a_gradient_scaler(tmp_path):
    fp16, m16 = train(TrainConfig(**BASE, max_steps=6, mixed_precision="fp16"), tmp_path / "a")
    fp32, m32 = train(TrainConfig(**BASE, max_steps=6), tmp_path / "b")
    # float16 really ran (the weights differ from float32's), to float16's precision
    assert fp16.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], abs=1e-2)
    assert fp16.history[0]["loss"] != fp32.history[0]["loss"]
    assert fp16.history[-1]["loss"] < fp16.history[0]["loss"]
    state = torch.load(tmp_path / "a" / "step-000006" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the scaler's state is part of the checkpoint


def test_a_model_trained_in_bf16_autocast_is_returned_as_a_plain_float32_model(tmp_path):
    res, model = train(TrainConfig(**BASE, max_steps=2, mixed_precision="bf16"), tmp_path)
    ids = data()[:2]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        plain = tiny_model("llama", seed=2, attention_dropout=0.2)
        plain.load_state_dict(model.state_dict())
        assert logits.dtype == torch.float32
        assert torch.equal(logits, plain(input_ids=ids).logits)  # no autocast left behind
