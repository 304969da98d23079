"""Small-model pretraining runs: kill-and-resume, the unigram bar, averaging of checkpoints."""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from compare.data import TextSplits
from compare.models import load_model
from ptq.errors import OptionsError
from qaft.averaging import average_state_dicts, lawa, lawa_steps, load_average, soup
from qaft.pretrain import ModelConfig, build_model, train_tokenizer, unigram_nll
from qaft.train import TrainConfig
from recipes.shared.pretraining import pretrain
from tests.conftest import markov_text

TEXT = TextSplits("markov", markov_text(6000, 1), markov_text(1200, 2))
TINY = ModelConfig(width=32, depth=1, vocab_size=300, seq_len=32)
TRAIN = TrainConfig(lr=1e-2, batch_size=4, max_steps=12, schedule="cosine", warmup_steps=2,
                    checkpoint_every=4, keep_checkpoints=10, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT.train, 300)


def run(out, tokenizer, config=TRAIN, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return pretrain(out, TEXT, tokenizer, TINY, config, progress=False, eval_tokens=512, **kw)


class Interrupt(Exception):
    pass


def test_kill_and_resume_gives_identical_weights(tokenizer, tmp_path):
    whole = run(tmp_path / "whole", tokenizer)
    calls = itertools.count(1)

    def die_at_step_7(model):
        if next(calls) == 7:
            raise Interrupt
        return 0.0
    killed = TrainConfig(**{**TRAIN.__dict__, "eval_every": 1})
    with pytest.raises(Interrupt):
        run(tmp_path / "killed", tokenizer, killed, eval_fn=die_at_step_7)
    resumed = run(tmp_path / "killed", tokenizer, killed, resume=True, eval_fn=lambda m: 0.0)
    assert resumed.train.resumed_from == 4
    a, _ = load_model(str(tmp_path / "whole"))
    b, _ = load_model(str(tmp_path / "killed"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert whole.heldout_nll == resumed.heldout_nll


def test_a_short_run_beats_the_unigram_model(tokenizer, tmp_path):
    res = run(tmp_path / "m", tokenizer, TrainConfig(**{**TRAIN.__dict__, "max_steps": 40}))
    assert res.heldout_nll < res.unigram_nll - 0.3
    # the unigram bar itself: a text of one repeated token costs nothing to predict
    assert unigram_nll(torch.zeros(50, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long),
                       4) == pytest.approx(-torch.tensor(51 / 54).log().item())


def test_averages(tokenizer, tmp_path):
    run(tmp_path / "r", tokenizer)
    ckpts = tmp_path / "r" / "checkpoints"
    assert lawa_steps(ckpts, 2) == [8, 12] and lawa_steps(ckpts, 2, at=9) == [4, 8]
    one = lawa(ckpts, 1, at=8)
    assert all(torch.equal(one[k], v) for k, v in average_state_dicts([one, one, one]).items())
    two = lawa(ckpts, 2)
    a, b = lawa(ckpts, 1, at=8), lawa(ckpts, 1)
    for k in two:
        torch.testing.assert_close(two[k], (a[k].double() + b[k].double()).div(2).float())
    model = load_average(build_model(TINY, tokenizer), two)
    # safetensors keeps one name of the tied pair; both modules see the averaged tensor
    stored = two.get("lm_head.weight", two.get("model.embed_tokens.weight"))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, stored)
    with pytest.raises(OptionsError, match="keeps 3 at or before step the end"):
        lawa_steps(ckpts, 4)
    with pytest.raises(OptionsError, match="several runs"):
        soup([tmp_path / "r"])
    s = soup([tmp_path / "r", tmp_path / "r"])
    final = load_file(tmp_path / "r" / "model.safetensors")
    assert s.keys() == final.keys() and all(torch.equal(s[k], v) for k, v in final.items())


def test_the_command_trains_a_model_every_qalign_command_loads(tmp_path, capsys):
    from recipes import cli

    text = tmp_path / "markov.txt"
    text.write_text(markov_text(6000, 1))
    out = tmp_path / "tiny"
    cli.main(["pretrain", "--data", str(text), "--width", "32", "--depth", "1",
              "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--tokens", "1024",
              "--checkpoint-tokens", "256", "--keep-checkpoints", "3", "--eval-tokens", "512",
              "--out", str(out)])
    report = json.loads((out / "qalign-pretrain.json").read_text())
    assert report["train"]["checkpoint_every"] == 2 and report["steps"] == 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000004", "step-000006", "step-000008"]
    capsys.readouterr()
    cli.main(["eval", "--model", str(out), "--data", str(text), "--seq-len", "32",
              "--max-tokens", "512", "--device", "cpu", "--dtype", "float32"])
    printed = capsys.readouterr().out
    evaluated = json.loads(printed[printed.index("{"):])
    # the same windows through `qalign eval` give the NLL pretraining reported
    assert evaluated["nll"] == pytest.approx(report["heldout_nll"], abs=1e-9)
    # with no --seq-len, the default (512) is capped at the model's 32 positions, said once
    cli.main(["eval", "--model", str(out), "--data", str(text), "--max-tokens", "512",
              "--device", "cpu", "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert "qalign: --seq-len 32: the model has 32 positions, fewer than the default 512" in printed
    assert json.loads(printed[printed.index("{"):])["nll"] == evaluated["nll"]
    # a length the user gives is kept, and refused when the model cannot hold it
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(out), "--data", str(text), "--seq-len", "64",
                  "--device", "cpu"])
    assert "--seq-len 64 exceeds the 32 positions" in capsys.readouterr().err
    cli.main(["quantize", "--model", str(out), "--data", str(text), "--spec", "int4-g16",
              "--method", "gptq", "--samples", "4", "--device", "cpu",
              "--out", str(tmp_path / "q")])
    assert json.loads((tmp_path / "q" / "qalign-quant.json").read_text())["budget"][
        "seq_len"] == 32  # the default block length, capped at the model's positions
