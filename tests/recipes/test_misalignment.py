import json
import math

import pytest

from compare.models import tiny_model
from ptq.registry import METHODS, Method
from recipes.misalignment import recipe as misalignment
from ptq.errors import QalignError
from recipes.misalignment.config import load_config
from tests.conftest import make_tokenizer

TINY = ["--bits", "2", "4", "--samples", "8", "--seq-len", "32", "--eval-seq-len", "32",
        "--eval-tokens", "256", "--probe-tokens", "128", "--checkpoint-every", "1",
        "--trajectory-every", "1", "--sensitivity-stride", "1", "--granularity", "g16"]


@pytest.fixture
def tiny3(tmp_path, text_file):
    """A saved 3-block tiny Llama, so that the GPTQ trajectory has 3 points."""
    tokenizer = make_tokenizer(text_file.read_text().split("\n\n"))
    path = tmp_path / "tiny3"
    tiny_model("llama", vocab_size=len(tokenizer), seed=0, num_hidden_layers=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _argv(model, text, out, *extra):
    return ["--model", str(model), "--data", str(text), *TINY, "--out", str(out), *extra]


def _correlations(alignment):
    for b, s in alignment.items():
        for key in ("per_layer", "per_layer_proxy", "across_solutions", "qaft_trajectory",
                    "gptq_trajectory"):
            yield b, key, s[key]


def test_recipe_end_to_end_schema_correlations_and_resume(tmp_path, tiny3, text_file, monkeypatch,
                                                          capsys):
    # a user's method (here RTN under another name), registered the way built-ins are
    monkeypatch.setitem(METHODS, "myrtn", Method("myrtn", METHODS["rtn"].fn,
                                                 METHODS["rtn"].options))
    out = tmp_path / "mis"
    argv = _argv(tiny3, text_file, out, "--methods", "rtn", "gptq", "qaft", "myrtn", "--no-tune",
                 "--gptq-variants", "act_order=false", "--landscape-t", "0.25", "0.5", "1.0",
                 "1.5")
    misalignment.main(argv)
    state = json.loads((out / "results.json").read_text())
    assert state["schema"] == "qalign.misalignment/3"
    for key in ("config", "versions", "budget", "heldout", "fp_probe_nll", "runs", "sensitivity",
                "radius", "alignment", "timings"):
        assert key in state
    ids = set(state["runs"])
    assert {"fp", "fp-ft", "rtn/int2-g16", "gptq/int2-g16", "qaft/int4-g16", "myrtn/int4-g16",
            "gptq[act_order=false]/int2-g16"} <= ids
    for b, key, c in _correlations(state["alignment"]):
        for name in ("spearman", "kendall"):
            assert isinstance(c[name], float) and math.isfinite(c[name]), (b, key, name)
            assert -1 <= c[name] <= 1
    runs = state["runs"]
    # one budget: GPTQ calibrates on what QAFT and the FP control train on
    unique = state["budget"]["unique_tokens"]
    assert unique == 8 * 32
    assert runs["gptq/int2-g16"]["budget"]["unique_tokens"] == unique
    assert runs["qaft/int2-g16"]["budget"]["unique_tokens"] == unique
    assert runs["qaft/int2-g16"]["budget"]["tokens_processed"] == \
        runs["fp-ft"]["budget"]["tokens_processed"] == 2 * unique
    # QAFT starts at RTN; the user's method equals RTN; GPTQ lowers the local loss
    start = runs["qaft/int2-g16"]["trajectory"][0]
    # (the start is measured on QAFT's float32 weights in the study's dtype, the RTN solution on
    # a model held in that dtype: equal up to bfloat16 rounding when the dtype is bfloat16)
    assert start["nll"] == pytest.approx(runs["rtn/int2-g16"]["metrics"]["probe_nll"], rel=2e-3)
    assert runs["myrtn/int2-g16"]["metrics"]["nll"] == runs["rtn/int2-g16"]["metrics"]["nll"]
    for b in (2, 4):
        assert runs[f"gptq/int{b}-g16"]["metrics"]["local_fp_mean"] < \
            runs[f"rtn/int{b}-g16"]["metrics"]["local_fp_mean"]
    assert runs["fp"]["metrics"]["kl"] == pytest.approx(0, abs=1e-6)
    assert all(r["metrics"]["kl"] > 0 for k, r in runs.items() if k != "fp")
    assert len(runs["gptq/int2-g16"]["trajectory"]) == 3
    assert runs["rtn/int2-g16"]["landscape"]["t"] == [0.25, 0.5, 1.0, 1.5]
    assert runs["rtn/int2-g16"]["landscape"]["nll_solution"][2] == \
        runs["rtn/int2-g16"]["metrics"]["probe_nll"]
    for name in ("report.md", "layers.csv", "nll_vs_bits.png", "sensitivity.png",
                 "solutions.png", "trajectories.png", "gptq_trajectory.png", "landscape.png",
                 "grad_cosine.png"):
        assert (out / name).stat().st_size > 0, name
    assert "## Alignment" in (out / "report.md").read_text()

    # resume: nothing is measured again, the numbers stay
    def fail(*a, **k):
        raise AssertionError("a finished unit was measured again")

    monkeypatch.setattr(misalignment, "measure", fail)
    monkeypatch.setattr(misalignment, "sensitivity", fail)
    misalignment.main(argv)
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == state["runs"] and again["alignment"] == state["alignment"]
    # another config in the same folder is refused rather than mixed in
    with pytest.raises(SystemExit) as e:
        misalignment.main(argv + ["--lr", "2e-5"])
    assert e.value.code == 2 and "another config" in capsys.readouterr().err


def test_interrupted_run_keeps_finished_units(tmp_path, tiny3, text_file, monkeypatch):
    out = tmp_path / "mis"
    real = misalignment.measure
    calls = []

    def flaky(study, plan):
        if plan.method == "qaft":
            raise KeyboardInterrupt
        calls.append(plan.id)
        return real(study, plan)

    monkeypatch.setattr(misalignment, "measure", flaky)
    argv = _argv(tiny3, text_file, out, "--bits", "3", "--methods", "rtn", "qaft",
                 "--gptq-variants")
    with pytest.raises(KeyboardInterrupt):
        misalignment.main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["runs"]) == ["fp", "fp-ft", "rtn/int3-g16"]
    monkeypatch.setattr(misalignment, "measure", real)
    misalignment.main(argv)
    final = json.loads((out / "results.json").read_text())
    assert list(final["runs"]) == ["fp", "fp-ft", "rtn/int3-g16", "qaft/int3-g16"]
    assert final["runs"]["rtn/int3-g16"] == saved["runs"]["rtn/int3-g16"]


def test_yaml_maps_onto_the_config_and_flags_win(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("preset: paper\nbits: [3]\nmethods: [rtn, gptq]\nlr: 2.0e-5\n")
    cfg = load_config("quick", path, {"lr": 3e-5})
    assert cfg.bits == (3,) and cfg.methods == ("rtn", "gptq") and cfg.lr == 3e-5
    assert (cfg.samples, cfg.seq_len) == (128, 2048)  # from the paper preset
    args = misalignment.build_parser().parse_args(["--config", str(path), "--samples", "4"])
    assert misalignment.config_from_args(args).samples == 4


@pytest.mark.parametrize("text, match", [
    ("bitz: [3]\n", r"unknown key\(s\) \['bitz'\]"),
    ("- 3\n", "mapping"),
    ("methods: [rtn, nope]\n", r"unknown \['nope'\]"),
    ("gptq_variants: [actorder=false]\n", "KEY=VALUE"),
    ("gptq_variants: [act_order=maybe]\n", "not true or false"),
    ("lr: .nan\n", "not a finite number"),
    ("lr: 1e-5x\n", "not a number"),
    ("samples: 2.5\n", "not an integer"),
    ("probe_tokens: 100000\n", "probe_tokens"),
])
def test_bad_recipe_files_name_the_problem(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(QalignError, match=match):
        load_config("quick", path)


def test_yaml_reads_1e_5_as_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-5\nlandscape_t: [0.5, 1]\n")  # YAML 1.1: '1e-5' is a string
    cfg = load_config("quick", path)
    assert cfg.lr == 1e-5 and cfg.landscape_t == (0.5, 1.0)


def test_plan_names_variants_and_extra_methods():
    cfg = load_config("quick", None, {"bits": [3], "gptq_variants": ["damp=0.1",
                                                                      "granularity=g128"]})
    ids = [p.id for p in misalignment.plan_runs(cfg)]
    assert ids == ["fp", "fp-ft", "rtn/int3-g64", "gptq/int3-g64", "gptq[damp=0.1]/int3-g64",
                   "gptq[granularity=g128]/int3-g128", "block-ap/int3-g64", "qaft/int3-g64",
                   "qaft-gptq/int3-g64"]
    two = load_config("quick", None, {"bits": [3], "methods": ["gptq"], "seeds": [0, 1],
                                      "gptq_variants": []})
    assert [p.id for p in misalignment.plan_runs(two)] == [
        "fp", "fp-ft@0", "fp-ft@1", "gptq/int3-g64@0", "gptq/int3-g64@1"]


def test_shipped_example_recipe_loads():
    from pathlib import Path

    import recipes

    path = Path(recipes.__file__).parent / "examples" / "misalignment-int3.yaml"
    cfg = load_config("quick", path)
    assert cfg.bits == (3,) and cfg.sensitivity_stride == 1 and len(cfg.gptq_variants) == 3


def test_schema_flag_prints_the_documented_schema(capsys):
    misalignment.main(["--schema"])
    text = capsys.readouterr().out
    for key in ("runs", "metrics", "trajectory", "landscape", "sensitivity", "alignment"):
        assert key in text


def test_tuned_run_records_every_trial_and_chooses_by_validation(tmp_path, tiny3, text_file):
    out = tmp_path / "tuned"
    argv = _argv(tiny3, text_file, out, "--bits", "2", "--methods", "rtn", "gptq", "qaft",
                 "--gptq-variants", "--trials", "2", "--val-samples", "2",
                 "--search", "qaft.lr=1e-4,1e-3", "qaft.scale_mode=fixed", "qaft.loss=nll",
                 "fp-ft.lr=1e-4,1e-3")
    misalignment.main(argv)
    state = json.loads((out / "results.json").read_text())
    assert state["search_spaces"]["qaft"] == {"lr": [1e-4, 1e-3], "scale_mode": ["fixed"],
                                              "loss": ["nll"]}
    for rid in ("rtn/int2-g16", "gptq/int2-g16", "qaft/int2-g16", "fp-ft"):
        run = state["runs"][rid]
        assert len(run["trials"]) == 2, rid
        vals = [t["val_nll"] for t in run["trials"]]
        best = run["trials"][vals.index(min(vals))]
        assert run["chosen"] == best["options"] and run["metrics"]["val_nll"] == min(vals)
    # every trial of a method spends the same budget: same unique tokens, same tokens processed
    qaft_trials = state["runs"]["qaft/int2-g16"]["trials"]
    assert len({t["tokens_processed"] for t in qaft_trials}) == 1
    cmp = state["alignment"]["2"]["comparisons"]["gptq vs qaft"]
    assert cmp["seeds"] == 1 and cmp["holds"] in (None, "a", "b")
    c = cmp["per_seed"][0]
    assert c["low"] <= c["diff"] <= c["high"]
    assert (out / "pareto.png").stat().st_size > 0
    assert "## Comparisons" in (out / "report.md").read_text()


def test_tuning_with_a_one_point_grid_equals_the_untuned_run(tmp_path, tiny3, text_file):
    pinned = ["--bits", "2", "--methods", "gptq", "qaft", "--gptq-variants", "--lr", "1e-3"]
    one = ["--trials", "2", "--search", "gptq.damp=0.01", "gptq.act_order=true",
           "gptq.clip_search=true", "gptq.static_groups=false", "qaft.lr=1e-3",
           "qaft.scale_mode=dynamic", "qaft.loss=nll", "fp-ft.lr=1e-3"]
    misalignment.main(_argv(tiny3, text_file, tmp_path / "a", *pinned, "--no-tune"))
    misalignment.main(_argv(tiny3, text_file, tmp_path / "b", *pinned, *one))
    a = json.loads((tmp_path / "a" / "results.json").read_text())["runs"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["runs"]
    for rid in ("gptq/int2-g16", "qaft/int2-g16", "fp-ft"):
        assert a[rid]["metrics"]["window_nll"] == b[rid]["metrics"]["window_nll"], rid
        assert [x["rel_err_fp"] for x in a[rid]["layers"]] == \
            [x["rel_err_fp"] for x in b[rid]["layers"]], rid
        assert len(b[rid]["trials"]) == 1, rid  # a one-point space is one trial, not two
    # and the report says how many trials ran, not how many were allowed
    assert "1 trial(s) (as many as the space has points, at most 2)" in (
        tmp_path / "b" / "report.md").read_text()


def test_two_seeds_resume_and_aggregate(tmp_path, tiny3, text_file, monkeypatch):
    from recipes.misalignment import measure as misalignment_measure

    out = tmp_path / "seeds"
    argv = _argv(tiny3, text_file, out, "--bits", "2", "--methods", "rtn", "gptq",
                 "--gptq-variants", "--seeds", "0", "1", "--no-tune")
    real = misalignment_measure.measure
    done = []

    def stop_after_four(study, plan):
        if len(done) == 4:
            raise KeyboardInterrupt
        done.append(plan.id)
        return real(study, plan)

    monkeypatch.setattr(misalignment, "measure", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        misalignment.main(argv)
    saved = json.loads((out / "results.json").read_text())["runs"]
    assert list(saved) == ["fp", "fp-ft@0", "fp-ft@1", "rtn/int2-g16@0"]
    monkeypatch.setattr(misalignment, "measure", real)
    misalignment.main(argv)
    state = json.loads((out / "results.json").read_text())
    assert state["runs"]["rtn/int2-g16@0"] == saved["rtn/int2-g16@0"]  # not recomputed
    # the two seeds draw different budgets, so GPTQ differs; RTN needs no data and does not
    g0, g1 = (state["runs"][f"gptq/int2-g16@{s}"]["metrics"]["nll"] for s in (0, 1))
    r0, r1 = (state["runs"][f"rtn/int2-g16@{s}"]["metrics"]["nll"] for s in (0, 1))
    assert g0 != g1 and r0 == r1
    spread = state["alignment"]["2"]["methods"]["gptq"]["perplexity"]
    assert spread["n"] == 2 and spread["min"] <= spread["mean"] <= spread["max"]
    assert spread["low"] <= spread["mean"] <= spread["high"]
    assert state["alignment"]["2"]["comparisons"]["rtn vs gptq"]["seeds"] == 2


def test_worked_example_method_and_the_locality_ladder(tmp_path, tiny3, text_file, monkeypatch):
    # the README's worked example: a layer method in a file, loaded with --plugin, run through
    # the main job next to a block method (block-ap) and QAFT; its rows reach the report
    from ptq import registry
    from recipes.cli import main

    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    out = tmp_path / "ladder"
    argv = _argv(tiny3, text_file, out, "--bits", "3", "--methods", "rtn", "diag-clip",
                 "block-ap", "qaft", "--no-tune", "--landscape-t", "1.0")
    main(["--plugin", "recipes/examples/diag_clip.py", "recipe", "misalignment", *argv])
    state = json.loads((out / "results.json").read_text())
    runs = state["runs"]
    levels = {r["method"]: r["level"] for r in runs.values()}
    assert levels == {"fp": None, "fp-ft": "global", "rtn": "layer", "diag-clip": "layer",
                      "block-ap": "block", "qaft": "global"}
    for r in runs.values():
        if r["bits"]:
            assert len(r["blocks"]) == 3 and r["metrics"]["block_fp_mean"] > 0
    # the block method minimizes the block-level loss on the budget: on held-out FP inputs it
    # stays below the layer methods'
    assert runs["block-ap/int3-g16"]["metrics"]["block_fp_mean"] < \
        runs["rtn/int3-g16"]["metrics"]["block_fp_mean"]
    lad = state["alignment"]["3"]["ladder"]
    assert list(lad["methods"])[:2] == sorted(["rtn", "diag-clip"], key=lambda m: (
        lad["methods"][m]["perplexity"]["mean"]))
    assert [lad["methods"][m]["level"] for m in lad["methods"]] == \
        ["layer", "layer", "block", "global"]
    for key in ("layer_alignment", "block_alignment"):
        assert lad[key]["n"] >= 4 and -1 <= lad[key]["spearman"] <= 1
    report = (out / "report.md").read_text()
    assert "## Locality ladder" in report and "| 3 | diag-clip | layer |" in report
    assert (out / "ladder.png").stat().st_size > 0


def test_a_study_grows_by_widths_and_seeds_without_recomputing(tmp_path, tiny3, text_file,
                                                                monkeypatch, capsys):
    from recipes.misalignment import measure as misalignment_measure

    grown, straight = tmp_path / "grown", tmp_path / "straight"
    base = ["--methods", "rtn", "gptq", "--gptq-variants", "--no-tune"]
    misalignment.main(_argv(tiny3, text_file, grown, *base, "--bits", "2", "--seeds", "0"))
    first = json.loads((grown / "results.json").read_text())["runs"]
    real, measured = misalignment_measure.measure, []

    def counting(study, plan):
        measured.append(plan.id)
        return real(study, plan)

    monkeypatch.setattr(misalignment, "measure", counting)
    more = [*base, "--bits", "2", "3", "--seeds", "0", "1"]
    misalignment.main(_argv(tiny3, text_file, grown, *more))
    state = json.loads((grown / "results.json").read_text())
    # only the new units ran; the finished ones are kept under their multi-seed ids
    assert "fp" not in measured and "rtn/int2-g16@0" not in measured
    assert "gptq/int2-g16@1" in measured and "gptq/int3-g16@0" in measured
    assert state["runs"]["gptq/int2-g16@0"]["metrics"] == first["gptq/int2-g16"]["metrics"]
    assert state["extended"][0]["bits"] == [3] and state["extended"][0]["seeds"] == [1]
    # and equal, unit for unit, to the same study run in one go
    misalignment.main(_argv(tiny3, text_file, straight, *more))
    direct = json.loads((straight / "results.json").read_text())["runs"]
    assert list(direct) == list(state["runs"])
    for rid, row in direct.items():
        assert state["runs"][rid]["metrics"]["nll"] == row["metrics"]["nll"], rid
    # a new first seed (it seeds the random directions) or a dropped method is another study
    for bad in (["--seeds", "1", "0"], ["--methods", "rtn"]):
        with pytest.raises(SystemExit):
            misalignment.main(_argv(tiny3, text_file, grown, *more, *bad))
        assert "another config" in capsys.readouterr().err


def test_qaft_from_gptq_starts_at_the_gptq_arms_choice_also_after_a_resume(tmp_path, tiny3,
                                                                          text_file, monkeypatch):
    # the fine-tuning arm comes after GPTQ whatever the order given, starts from the solution
    # the GPTQ arm chose, and a run stopped between the two gives the same numbers on resume
    # (the start is recomputed from the recorded choice)
    argv = ["--bits", "2", "--methods", "qaft-gptq", "gptq", "--gptq-variants", "--trials", "2",
            "--val-samples", "2", "--search", "gptq.act_order=true,false", "gptq.damp=0.01",
            "gptq.clip_search=false", "gptq.static_groups=false", "qaft-gptq.lr=1e-3",
            "qaft-gptq.scale_mode=learned", "qaft-gptq.loss=nll", "fp-ft.lr=1e-3"]
    misalignment.main(_argv(tiny3, text_file, tmp_path / "straight", *argv))
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())["runs"]
    assert list(straight)[-2:] == ["gptq/int2-g16", "qaft-gptq/int2-g16"]
    assert len(straight["gptq/int2-g16"]["trials"]) == 2
    start = straight["qaft-gptq/int2-g16"]["start"]
    assert start == {"method": "gptq", "options": straight["gptq/int2-g16"]["chosen"],
                     "from": "gptq arm"}
    assert "qaft-gptq/int2-g16: QAFT from the solution the GPTQ run" in (
        tmp_path / "straight" / "report.md").read_text()

    real = misalignment.measure

    def stop_at_qaft(study, plan):
        if plan.method == "qaft-gptq":
            raise KeyboardInterrupt
        return real(study, plan)

    monkeypatch.setattr(misalignment, "measure", stop_at_qaft)
    with pytest.raises(KeyboardInterrupt):
        misalignment.main(_argv(tiny3, text_file, tmp_path / "resumed", *argv))
    monkeypatch.setattr(misalignment, "measure", real)
    misalignment.main(_argv(tiny3, text_file, tmp_path / "resumed", *argv))
    resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())["runs"]
    for rid in ("gptq/int2-g16", "qaft-gptq/int2-g16"):
        assert resumed[rid]["metrics"]["window_nll"] == straight[rid]["metrics"]["window_nll"]
    assert resumed["qaft-gptq/int2-g16"]["start"] == start
