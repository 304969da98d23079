"""The training recipes end to end on tiny runs: training-dynamics (paper A) and
optimizer-choices (paper D)."""

import json
import statistics

import pytest

from compare.evaluate import evaluate_nll
from recipes.shared.pretraining import finished
from recipes.shared.common import ConfigError
from recipes.optimizer_choices import ChoicesConfig, plan as choices_plan
from recipes.optimizer_choices import run_recipe as run_choices
from recipes.shared.training import Workbench
from recipes.training_dynamics import DynamicsConfig, plan as dynamics_plan
from recipes.training_dynamics import run_recipe as run_dynamics
from tests.conftest import markov_text

SMALL = dict(vocab_size=300, seq_len=32, batch_size=4, calib_samples=4, eval_tokens=512)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "markov.txt"
    path.write_text(markov_text(9000, 1))
    return str(path)


def test_training_dynamics_end_to_end(corpus, tmp_path):
    cfg = DynamicsConfig(data=corpus, **SMALL, steps=8, warmup_steps=1, peak_lrs=(1e-2,),
                         cooldown_at=(0.5, 1.0), cooldown_fraction=0.5, checkpoint_every=2,
                         lawa_window=2, settings=("rtn:int3-g64", "gptq:int3-g64"),
                         focus="gptq:int3-g64")
    runs = dynamics_plan(cfg)
    assert [r.id for r in runs] == ["constant-lr0.01", "wsd-lr0.01-at4", "wsd-lr0.01-at8",
                                    "cosine-lr0.01"]
    state = run_dynamics(cfg, tmp_path, progress=False)
    pts = state["points"]
    # every checkpoint of every run, LAWA from the second constant-run checkpoint on
    assert {k for k in pts if k.startswith("constant")} == {
        "constant-lr0.01@2", "constant-lr0.01@4", "constant-lr0.01@6", "constant-lr0.01@8",
        "constant-lr0.01@4+lawa2", "constant-lr0.01@6+lawa2", "constant-lr0.01@8+lawa2"}
    assert {k for k in pts if k.startswith("wsd-lr0.01-at4")} == {
        "wsd-lr0.01-at4@5", "wsd-lr0.01-at4@6"}
    # the cooldown decays to 0 at its last step; the constant run never decays
    assert pts["wsd-lr0.01-at4@6"]["lr"] == 0.0 and pts["constant-lr0.01@8"]["lr"] == 1e-2
    for p in pts.values():
        for s in cfg.settings:
            assert p["qerr"][s] == pytest.approx(p["ptq"][s] / p["fp_nll"] - 1)
    # the point measured from the last checkpoint is the model pretrain saved and evaluated
    saved = finished(tmp_path / "runs" / "cosine-lr0.01")
    assert pts["cosine-lr0.01@8"]["fp_nll"] == pytest.approx(saved["heldout_nll"], abs=1e-9)
    f = state["findings"]
    assert len(f["cooldowns"]) == 2 and len(f["averaging"]) == 3
    # the noise floor: the spread of the error between consecutive constant-LR checkpoints
    q = [pts[f"constant-lr0.01@{s}"]["qerr"]["gptq:int3-g64"] for s in (2, 4, 6, 8)]
    assert f["noise"] == pytest.approx(statistics.pstdev([b - a for a, b in zip(q, q[1:])]))
    for name in ("report.md", "points.csv", "trajectories.png", "quantized_vs_fp.png",
                 "averaging.png"):
        assert (tmp_path / name).is_file()
    # a rerun measures and trains nothing
    before = json.loads((tmp_path / "results.json").read_text())
    again = run_dynamics(cfg, tmp_path, progress=False)
    assert again["seconds"] == before["seconds"] and again["points"] == before["points"]


def test_optimizer_choices_end_to_end(corpus, tmp_path):
    cfg = ChoicesConfig(data=corpus, **SMALL, steps=8, warmup_steps=1,
                        variants=("weight_decay=0", "precision=fp16", "grad_clip=0"),
                        baseline_seeds=(0, 1), early_fraction=0.5, outlier_windows=4,
                        settings=("w8a8", "rtn:int3-ch"))
    assert [c.id for c in choices_plan(cfg)] == [
        "baseline-seed0", "baseline-seed1", "weight_decay=0.0", "precision=fp16",
        "grad_clip=0.0"]
    state = run_choices(cfg, tmp_path, progress=False)
    runs = state["runs"]
    assert runs["precision=fp16"]["factors"]["precision"] == "fp16"
    for r in runs.values():
        for when in ("early", "final"):
            p = r[when]
            for s in cfg.settings:
                assert p["degradation"][s] == pytest.approx(100 * (p["ptq"][s] / p["fp_nll"] - 1))
            assert p["outliers"]["max_abs"] > 0 and len(p["outliers_per_layer"]) == 28
    # the seed changes the run; a variant changes only its factor (fp16 trains differently)
    assert runs["baseline-seed0"]["final"]["fp_nll"] != runs["baseline-seed1"]["final"]["fp_nll"]
    assert runs["precision=fp16"]["final"]["fp_nll"] != runs["baseline-seed0"]["final"]["fp_nll"]
    f = state["findings"]
    assert f["floor"]["w8a8"]["n"] == 2 and len(f["effects"]) == 6
    assert f["early_vs_final"]["w8a8"]["n"] == 5
    assert "bf16 training helps" in (tmp_path / "report.md").read_text()


def test_configs_refuse_what_cannot_run(tmp_path):
    from recipes import optimizer_choices, training_dynamics

    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 100\nwarmup: 3\n")
    for module in (training_dynamics, optimizer_choices):
        args = module.build_parser().parse_args(["--config", str(bad)])
        with pytest.raises(ConfigError, match=r"unknown key\(s\) \['warmup'\]; known: "):
            module.config_from_args(args)
    good = tmp_path / "good.yaml"
    good.write_text("preset: cpu\nsteps: 100\npeak_lrs: [1e-3]\n")
    args = training_dynamics.build_parser().parse_args(["--config", str(good), "--steps", "200"])
    cfg = training_dynamics.config_from_args(args)
    assert cfg.steps == 200 and cfg.peak_lrs == (1e-3,)  # flags win over the file
    for kw, fix in [(dict(cooldown_at=(1.5,)), "cannot branch after the end of training"),
                    (dict(lawa_window=40), "shorten the window"),
                    (dict(focus="gptq:int2-g64"), "must be one of settings"),
                    (dict(settings=("gptq:int3-g100",)), "must be one of settings"),
                    (dict(warmup_steps=300), "branch after the warmup")]:
        with pytest.raises(ConfigError, match=fix):
            DynamicsConfig(**kw)
    for kw, fix in [(dict(variants=("momentum=0.9",)), "KEY one of"),
                    (dict(variants=("weight_decay=0.1",)), "repeats the baseline"),
                    (dict(variants=("precision=fp8",)), "precision is one of"),
                    (dict(baseline_seeds=(0, 0)), "distinct seeds"),
                    (dict(early_fraction=1.0), "fraction in (0, 1)")]:
        with pytest.raises(ConfigError, match=fix.replace("(", r"\(").replace(")", r"\)")):
            ChoicesConfig(**kw)


def test_a_finished_run_of_another_config_is_refused(corpus, tmp_path):
    from qaft.pretrain import ModelConfig
    from qaft.train import TrainConfig

    bench = Workbench(tmp_path, data=corpus, vocab_size=300, seq_len=32, eval_tokens=256,
                      calib_samples=2, settings=("rtn:int4-g32",), progress=False)
    model = ModelConfig(vocab_size=300, seq_len=32)
    train = TrainConfig(lr=1e-2, batch_size=4, max_steps=2)
    report = bench.train(tmp_path / "r", model, train)
    assert report["steps"] == 2 and bench.train(tmp_path / "r", model, train) == report
    with pytest.raises(ConfigError, match="trained under another model or training config"):
        bench.train(tmp_path / "r", model, TrainConfig(lr=1e-3, batch_size=4, max_steps=2))
    # measure() reloads the checkpoint before each setting: FP NLL equals a plain evaluation
    row = bench.measure(tmp_path / "r" / "checkpoints" / "step-000002", model)
    plain = evaluate_nll(bench.load(bench.model(model), tmp_path / "r" / "checkpoints" /
                                    "step-000002"), bench.windows, progress=False).nll
    assert row["fp_nll"] == plain


def test_fp_scaling_end_to_end(corpus, tmp_path):
    from recipes.fp_scaling import FPScalingConfig, plan as fp_plan, run_recipe as run_fp

    cfg = FPScalingConfig(data=corpus, vocab_size=300, seq_len=32, batch_size=4,
                          sizes=("w32d1", "w64d1"), tokens=(1024, 2048),
                          formats=("e2m1", "e4m3", "e1m2"), blocks=(16, 32),
                          ptq_settings=("rtn:e2m1-g16", "gptq:e4m3-g16"), calib_samples=4,
                          eval_tokens=512, fit_free=("n", "d", "eps"))
    assert len(fp_plan(cfg)) == 24
    state = run_fp(cfg, tmp_path, progress=False)
    runs = state["runs"]
    r = runs["w64d1-D2048-e2m1-B16"]
    assert (r["E"], r["M"], r["B"], r["D"]) == (2, 1, 16, 2048)
    # W rounded in the forward to e2m1 with blocks of 16 along its inputs is RTN e2m1-g16
    assert r["loss"] == pytest.approx(r["ptq"]["ptq"]["rtn:e2m1-g16"], abs=1e-9)
    assert r["loss"] != r["loss_plain"]
    assert state["fit"] is not None and state["fit"]["n_runs"] == 24
    assert set(state["fit"]["fitted"]) == {"n", "d", "eps"}
    report = (tmp_path / "report.md").read_text()
    assert "| eps |" in report and "published" in report
    for name in ("predicted_vs_actual.png", "loss_vs_tokens.png", "best_split.png", "runs.csv"):
        assert (tmp_path / name).is_file()
