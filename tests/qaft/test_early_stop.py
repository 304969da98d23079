import dataclasses

import pytest
import torch

import qaft
from compare.models import tiny_model
from ptq.errors import OptionsError
from qaft.checkpoints import checkpoint_steps
from qaft.train import TrainConfig, finetune
from tests.qaft.test_train import blocks
from tests.qaft.test_train_resume import CONFIG, Interrupt, data, model, no_stop, stop_at


def scripted(values, start=0):
    """A validate_fn returning values[start], values[start + 1], ... on successive calls."""
    it = iter(values[start:])
    return lambda m: next(it)


def snapshots():
    """An eval_fn that keeps a copy of the whole state at every step it is called."""
    saved = {}

    def eval_fn(m):
        saved[len(saved) + 1] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        return 0.0
    return saved, eval_fn


def lsq_model():
    m = tiny_model("llama", seed=0)
    qaft.prepare(m, "int4-g16", qaft.QAFTConfig(scale_mode="learned", learn_zero=True))
    return m


def test_early_stopping_restores_the_state_of_the_best_validation():
    m = lsq_model()
    saved, eval_fn = snapshots()
    res = finetune(m, blocks(), TrainConfig(lr=3e-3, max_steps=10, batch_size=2, eval_every=1,
                                            validate_every=1, patience=2),
                   eval_fn=eval_fn, validate_fn=scripted([5, 4, 3, 3.5, 3.6, 3.7]),
                   progress=False)
    # step 0 (before training) 5, then 4, 3 (best, step 2), 3.5 and 3.6: two without improvement
    assert res.stopped_early and res.steps == 4 and sorted(saved) == [1, 2, 3, 4]
    assert (res.best_step, res.best_val_nll) == (2, 3.0)
    assert [(r["step"], r["val_nll"]) for r in res.history] == [
        (0, 5), (1, 4), (2, 3), (3, 3.5), (4, 3.6)]
    assert "loss" not in res.history[0] and res.history[0]["tokens_processed"] == 0
    state = m.state_dict()
    for name, value in saved[2].items():  # weights, LSQ scales and zero points of step 2
        assert torch.equal(state[name], value), name
    assert not torch.equal(saved[2]["model.layers.0.mlp.up_proj.linear.weight"],
                           saved[4]["model.layers.0.mlp.up_proj.linear.weight"])

    # restore_best False: the last state stays, the best is recorded all the same
    m_last = lsq_model()
    last = finetune(m_last, blocks(), TrainConfig(lr=3e-3, max_steps=10, batch_size=2,
                                                  validate_every=1, patience=2,
                                                  restore_best=False),
                    validate_fn=scripted([5, 4, 3, 3.5, 3.6, 3.7]), progress=False)
    assert (last.steps, last.best_step, last.stopped_early) == (4, 2, True)
    assert all(torch.equal(a, b) for a, b in zip(m_last.state_dict().values(),
                                                 saved[4].values()))


def test_no_training_can_win_and_patience_0_never_stops():
    m = lsq_model()
    start = {k: v.clone() for k, v in m.state_dict().items()}
    res = finetune(m, blocks(), TrainConfig(lr=3e-3, max_steps=5, batch_size=2,
                                            validate_every=2),
                   validate_fn=scripted([1.0, 2.0, 3.0, 4.0]), progress=False)
    # validated at steps 0, 2, 4 and the last step 5; never better than before training
    assert [r["step"] for r in res.history if "val_nll" in r] == [0, 2, 4, 5]
    assert (res.steps, res.best_step, res.best_val_nll, res.stopped_early) == (5, 0, 1.0, False)
    assert all(torch.equal(start[k], v) for k, v in m.state_dict().items())


def test_validation_without_a_verdict_changes_nothing_in_training():
    # Validation runs in eval mode under no_grad: with dropout on and the last state kept, the
    # run is bit for bit the run without validation (which is today's loop: no validate_fn).
    def run(**kw):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = model()  # attention dropout 0.3
            cfg = dataclasses.replace(CONFIG, checkpoint_every=0, **kw)
            return finetune(m, data(), cfg, progress=False, **(
                {"validate_fn": lambda _: 1.0} if kw else {})), m

    plain, m_plain = run()
    validated, m_validated = run(validate_every=1, restore_best=False)
    assert all(torch.equal(a, b) for a, b in zip(m_plain.state_dict().values(),
                                                 m_validated.state_dict().values()))
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in validated.history[1:]]
    assert all("val_nll" not in r for r in plain.history) and plain.history[0]["step"] == 1
    assert (plain.best_step, plain.best_val_nll, plain.stopped_early) == (None, None, False)


VALUES = [5, 4, 3, 3.5, 3.2, 3.6, 3.7, 3.8]  # best at step 2; 3 bad validations end it at 5


def test_the_best_state_survives_an_interruption_and_resume(tmp_path):
    config = dataclasses.replace(CONFIG, validate_every=1, patience=3)

    def run(directory, rng_seed, values_from=0, **kw):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed)
            m = model()
            return finetune(m, data(), config, checkpoint_dir=directory, progress=False,
                            validate_fn=scripted(VALUES, values_from), **kw), m

    full, m_full = run(tmp_path / "full", 0, eval_fn=no_stop)
    assert (full.steps, full.best_step, full.stopped_early) == (5, 2, True)
    assert checkpoint_steps(tmp_path / "full") == [5]  # written when it stopped

    with pytest.raises(Interrupt):
        run(tmp_path / "cut", 0, eval_fn=stop_at(5))
    assert checkpoint_steps(tmp_path / "cut") == [4]  # the best (step 2) lives only in there
    # the resumed run validates from step 5 on: its validate_fn starts there
    resumed, m_resumed = run(tmp_path / "cut", 99, values_from=5, eval_fn=no_stop, resume=True)
    assert resumed.resumed_from == 4
    assert (resumed.steps, resumed.best_step, resumed.best_val_nll, resumed.stopped_early) == (
        5, 2, 3.0, True)
    for (name, a), b in zip(m_full.state_dict().items(), m_resumed.state_dict().values()):
        assert torch.equal(a, b), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip

    # resuming a run that stopped early trains nothing and gives the same result back
    again, m_again = run(tmp_path / "full", 7, values_from=len(VALUES), eval_fn=no_stop,
                         resume=True)
    assert (again.resumed_from, again.steps, again.best_step, again.stopped_early) == (
        5, 5, 2, True)
    assert all(torch.equal(a, b) for a, b in zip(m_full.state_dict().values(),
                                                 m_again.state_dict().values()))


def test_validation_options_are_checked():
    with pytest.raises(OptionsError, match="patience=2 counts validations"):
        TrainConfig(patience=2)
    with pytest.raises(OptionsError, match="validate_every"):
        TrainConfig(validate_every=-1)
    with pytest.raises(OptionsError, match="needs validate_fn="):
        finetune(tiny_model("llama"), blocks(), TrainConfig(max_steps=1, validate_every=1),
                 progress=False)
    with pytest.raises(OptionsError, match="validate_every is 0"):
        finetune(tiny_model("llama"), blocks(), TrainConfig(max_steps=1),
                 validate_fn=lambda m: 0.0, progress=False)
