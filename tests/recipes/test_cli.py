import json

import pytest
import torch

import ptq
import ptq.checkpoint
from compare.models import load_model
from recipes import cli
from recipes.ptq_table import recipe as ptq_table
from recipes.shared.common import ConfigError


@pytest.mark.parametrize("argv", [[], ["prepare"], ["quantize"], ["eval"], ["recipe"],
                                  ["recipe", "ptq-table"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage: qalign" in capsys.readouterr().out


def test_every_flag_has_help():
    parser = cli.build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
            elif action.option_strings and action.dest != "help":
                assert action.help, f"{p.prog} {action.option_strings} has no help"


def test_bad_spec_exits_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--spec", "int9-g64"])
    assert e.value.code == 2
    assert "integer grids have 2..8 bits" in capsys.readouterr().err


def test_quantize_then_eval(tmp_path, tiny_model_dir, text_file, capsys):
    out = tmp_path / "q"
    cli.main(["quantize", "--model", str(tiny_model_dir), "--spec", "int3-g16", "--dtype", "float32",
              "--out", str(out),
              "--device", "cpu"])
    original, _ = load_model(str(tiny_model_dir))
    quantized, _ = load_model(str(out))
    for (name, a), (_, b) in zip(ptq.quantizable_linears(original),
                                 ptq.quantizable_linears(quantized)):
        assert torch.equal(b.weight, ptq.fake_quantize(a.weight, "int3-g16")), name
    report = json.loads((out / "qalign-quant.json").read_text())
    assert report["spec"] == "int3-g16" and len(report["layers"]) == 14
    assert (out / "layers.csv").read_text().count("\n") == 15

    cli.main(["eval", "--model", str(out), "--data", str(text_file), "--seq-len", "32",
              "--max-tokens", "128", "--device", "cpu", "--json", str(tmp_path / "e.json")])
    row = json.loads((tmp_path / "e.json").read_text())
    assert row["n_windows"] == 4 and row["scored_tokens"] == 4 * 31
    assert row["perplexity"] == pytest.approx(2.718281828 ** row["nll"], rel=1e-9)


def test_ptq_table_writes_results_and_resumes(tmp_path, tiny_model_dir, text_file, monkeypatch):
    argv = ["--model", str(tiny_model_dir), "--data", str(text_file), "--bits", "2", "4",
            "--granularity", "ch", "g16", "--seq-len", "32", "--max-tokens", "128",
            "--samples", "4", "--methods", "rtn", "gptq", "--gptq-act-order",
            "--device", "cpu", "--out", str(tmp_path / "t")]
    result = ptq_table.run(ptq_table.build_parser().parse_args(argv))
    keys = [(r["method"], r["spec"]) for r in result["rows"]]
    assert keys == [("fp", "fp32")] + [(m, s) for s in ("int2-ch", "int2-g16", "int4-ch",
                                                         "int4-g16") for m in ("rtn", "gptq")]
    assert result["config"]["options"]["gptq"]["act_order"] is True
    assert all(r["calibration_tokens"] == (4 * 32 if r["method"] == "gptq" else 0)
               for r in result["rows"])
    for name in ("results.json", "table.md", "ptq.png"):
        assert (tmp_path / "t" / name).stat().st_size > 0
    # each row starts from the unquantized model: restoring weights between rows works
    assert len({r["nll"] for r in result["rows"]}) == len(keys)

    def no_eval(*a, **k):
        raise AssertionError("a finished row was computed again")

    monkeypatch.setattr(ptq_table, "evaluate_nll", no_eval)
    again = ptq_table.run(ptq_table.build_parser().parse_args(argv))
    assert again["rows"] == result["rows"]
    other = [a if a != "32" else "16" for a in argv]  # --seq-len 16: another config
    with pytest.raises(ConfigError, match="another config"):
        ptq_table.run(ptq_table.build_parser().parse_args(other))


def test_option_flag_of_another_method_is_an_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--model", str(tiny_model_dir), "--spec", "int4", "--method",
                  "rtn", "--gptq-act-order", "--out", str(tmp_path / "unused")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--gptq-act-order: option(s) of method gptq" in err and "Traceback" not in err
    assert not (tmp_path / "unused").exists()


def test_each_method_has_its_own_flags_and_defaults():
    # two methods with a field of the same name (clip_search) get two flags, each with its own
    # method's default in the help, and each reaches only its own method's options
    from recipes.shared.quantization import method_options

    parser = cli.build_parser()
    args = parser.parse_args(["quantize", "--spec", "int4", "--method", "gptq", "--out", "x",
                              "--no-gptq-clip-search", "--gptq-damp", "0.05"])
    opts = method_options(args, ["gptq"])["gptq"]
    assert opts == ptq.GPTQOptions(clip_search=False, damp=0.05)
    helps = {a.option_strings[0]: a.help for a in parser._subparsers._group_actions[0]
             .choices["quantize"]._actions if a.option_strings}
    assert "default: True" in helps["--gptq-clip-search"]
    assert "default: False" in helps["--rtn-clip-search"]


def test_flags_follow_real_types_without_future_annotations():
    # a plug-in written without `from __future__ import annotations`: types are real objects
    import argparse
    from dataclasses import dataclass

    from recipes.shared.flags import add_dataclass_flags, from_args, from_mapping

    @dataclass(frozen=True)
    class PlainOptions:
        rate: float = 0.5
        steps: int = 3
        on: bool = False
        widths: tuple[int, ...] = (2, 3)

    p = argparse.ArgumentParser()
    add_dataclass_flags(p, PlainOptions, prefix="plain")
    args = p.parse_args(["--plain-rate", "1e-5", "--plain-on", "--plain-widths", "4", "8"])
    assert from_args(PlainOptions, args, prefix="plain") == PlainOptions(1e-5, 3, True, (4, 8))
    # YAML 1.1 reads 1e-5 as a string: it is still a float for a float field
    assert from_mapping(PlainOptions, {"rate": "1e-5"}, "f.yaml").rate == 1e-5
    with pytest.raises(ptq.OptionsError, match="f.yaml: rate: 'nan' is not a finite number"):
        from_mapping(PlainOptions, {"rate": "nan"}, "f.yaml")
    with pytest.raises(ptq.OptionsError, match="unknown key"):
        from_mapping(PlainOptions, {"rte": 1}, "f.yaml")


@pytest.mark.parametrize("mode,extra", [("qaft", []), ("qaft", ["--init", "gptq"]),
                                        ("lora", ["--lora-rank", "4"]), ("fp", [])])
def test_finetune_saves_a_loadable_result(tmp_path, tiny_model_dir, text_file, mode, extra):
    out = tmp_path / mode
    spec = [] if mode == "fp" else ["--spec", "int4-g16"]
    cli.main(["finetune", "--model", str(tiny_model_dir), "--mode", mode, *spec, *extra,
              "--data", str(text_file), "--samples", "4", "--seq-len", "16", "--batch-size", "2",
              "--lr", "1e-3", "--device", "cpu", "--out", str(out)])
    report = json.loads((out / "qalign-finetune.json").read_text())
    assert report["steps"] == 2 and report["unique_tokens"] == 4 * 16
    assert report["tokens_processed"] == 4 * 16
    model, _ = load_model(str(out))
    original, _ = load_model(str(tiny_model_dir))
    codes = ptq.checkpoint.read_quantized(out)[1] if mode != "fp" else {}
    for (name, m), (_, o) in zip(ptq.quantizable_linears(model), ptq.quantizable_linears(original)):
        assert not torch.equal(m.weight, o.weight), name  # it trained (or was quantized)
        if mode == "fp":
            continue
        qt = codes[name]
        # the loaded weight lies on the grid its stored scales define (a latent, off-grid weight
        # saved by mistake would move when rounded with them) ...
        again = ptq.fake_quantize_with(m.weight, ptq.QParams(qt.scale, qt.zero.float()), qt.spec)
        assert torch.equal(again, m.weight), name
        # ... and fine-tuning moved it off plain RTN of the original weight
        if mode == "qaft" and not extra:
            assert not torch.equal(m.weight, ptq.fake_quantize(o.weight, "int4-g16")), name
    if mode == "lora":
        assert "re-quantized" in report["note"]


def test_same_budget_recipe_rows_and_accounting(tmp_path, tiny_model_dir, text_file):
    from recipes import same_budget

    argv = ["--model", str(tiny_model_dir), "--data", str(text_file), "--bits", "3",
            "--granularity", "g16", "--samples", "4", "--seq-len", "16", "--epochs", "2",
            "--lr", "1e-3", "--eval-seq-len", "32", "--max-tokens", "128", "--device", "cpu",
            "--out", str(tmp_path / "sb")]
    result = same_budget.run(same_budget.build_parser().parse_args(argv))
    rows = {(r["method"], r["spec"]): r for r in result["rows"]}
    assert list(rows) == [("fp", "fp32"), ("fp-ft", "fp32"), ("rtn", "int3-g16"),
                          ("gptq", "int3-g16"), ("qaft", "int3-g16")]
    for key in (("fp-ft", "fp32"), ("qaft", "int3-g16")):
        assert rows[key]["unique_tokens"] == 64 and rows[key]["tokens_processed"] == 128
    assert rows[("gptq", "int3-g16")]["unique_tokens"] == 64
    assert rows[("rtn", "int3-g16")]["unique_tokens"] == 0
    assert (tmp_path / "sb" / "same_budget.png").stat().st_size > 0


def test_quantize_exports_compressed_tensors_that_transformers_loads(tmp_path, tiny_model_dir):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    own, ct = tmp_path / "own", tmp_path / "ct"
    for out, fmt in ((own, "qalign"), (ct, "compressed-tensors")):
        cli.main(["quantize", "--model", str(tiny_model_dir), "--spec", "int4-g16", "--method",
                  "gptq", "--samples", "4", "--seq-len", "16", "--export", fmt, "--dtype",
                  "float32", "--out",
                  str(out), "--device", "cpu"])
    ours, _ = load_model(str(own))
    theirs = AutoModelForCausalLM.from_pretrained(ct)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert json.loads((ct / "qalign-quant.json").read_text())["method"] == "gptq"


def test_export_of_a_grid_the_format_cannot_hold_is_refused_before_work(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--spec", "e2m1-g16", "--export", "compressed-tensors", "--out",
                  str(tmp_path / "ct"), "--model", "./no-model-needed-yet"])
    assert e.value.code == 2 and "save_quantized" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()


def test_auto_dtype_never_picks_float16_and_is_recorded(tmp_path, tiny_model_dir, text_file):
    # auto gives bfloat16 on CPUs with bf16 units, float32 elsewhere, never float16 on a CPU;
    # the eval row says which dtype computed it
    cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(text_file), "--seq-len", "32",
              "--max-tokens", "64", "--device", "cpu", "--json", str(tmp_path / "e.json")])
    row = json.loads((tmp_path / "e.json").read_text())
    assert row["dtype"] in ("bfloat16", "float32")
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--model", str(tiny_model_dir), "--dtype", "float16", "--device", "cpu"])
    assert e.value.code == 2
