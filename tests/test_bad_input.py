"""Bad input, end to end: every mistake is refused with a message naming the fix, and nothing is
written.

Through the command line (`recipes.cli.main` and the recipes' own `main`), each case must exit
with code 2 and print exactly one line: `qalign: error: ...` for the toolkit's own checks, or
argparse's usage followed by its one `...: error: ...` line for a flag argparse itself refuses.
No traceback, no file created, changed or removed under `--out` (its tree's names, sizes and
mtimes are compared), and, where a case says so, no model or text loaded before the refusal.
Through the library, each case raises the toolkit's error type with a message naming the fix.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch

import ptq
import qaft
from compare.data import DataBudget, DataError, load_text
from compare.models import ModelError, load_model, tiny_model
from recipes import cli, misalignment, ptq_table, same_budget
from recipes.misalignment.config import load_config
from tests.conftest import _sentences, make_tokenizer

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a 0o555 folder; "
                              "out-under-a-file covers an unwritable --out")
# ptq.errors.NonFiniteError comes with the pending non-finite checks
NonFiniteError = getattr(ptq.errors, "NonFiniteError", ptq.QalignError)
# cases that need the non-finite-weight and checkpoint-integrity checks being finished in
# ptq/formats.py and ptq/checkpoint.py
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny Llama with its tokenizer, its text, and the bad files the cases point at."""
    root = tmp_path_factory.mktemp("bad-input")
    sents = _sentences(240, seed=1)
    text = "\n\n".join(" ".join(sents[i:i + 4]) for i in range(0, 240, 4))
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    tokenizer = make_tokenizer(text.split("\n\n"))
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    model.save_pretrained(root / "no-tokenizer")  # weights and config, no tokenizer files
    broken = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    broken.save_pretrained(root / "nan-weight")
    tokenizer.save_pretrained(root / "nan-weight")
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]),
                         ("tampered", lambda b: b[:-64] + bytes(64))):
        quantized = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
        res = ptq.quantize_model(quantized, "int4", "rtn", progress=False)
        ptq.save_quantized(quantized, res.quantized, root / name)
        tokenizer.save_pretrained(root / name)
        codes = root / name / "qalign.safetensors"
        codes.write_bytes(damage(codes.read_bytes()))
    (root / "no-config").mkdir()
    (root / "no-config" / "README").write_text("not a model")
    (root / "binary.txt").write_bytes(b"abc\xff\xfe\x00def\n\nmore text")
    (root / "empty.txt").write_bytes(b"")
    paths = {"model": "tiny", "data": "corpus.txt", "notok": "no-tokenizer",
             "nocfg": "no-config", "dir": "no-config", "bin": "binary.txt", "empty": "empty.txt",
             "nan": "nan-weight", "truncated": "truncated", "tampered": "tampered"}
    return {**{k: str(root / v) for k, v in paths.items()},
            "max_positions": model.config.max_position_embeddings}


@pytest.fixture(autouse=True)
def quiet_loading():
    """transformers' 'Loading weights' bar would be a second stderr line."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


def test_tiny_model_positions(files):
    # the --seq-len 4096 cases below must exceed the tiny model's positions
    assert files["max_positions"] == 2048


# --- the command line -------------------------------------------------------------------------

Q = ["quantize", "--model", "{model}", "--data", "{data}", "--device", "cpu", "--out", "{out}",
     "--spec", "int4"]
E = ["eval", "--model", "{model}", "--data", "{data}", "--device", "cpu", "--seq-len", "16",
     "--max-tokens", "64", "--json", "{out}/eval.json"]
T0 = ["finetune", "--model", "{model}", "--data", "{data}", "--device", "cpu", "--out", "{out}",
      "--samples", "4", "--seq-len", "16"]
T = T0 + ["--spec", "int4-g16"]
P = ["--model", "{model}", "--data", "{data}", "--device", "cpu", "--out", "{out}",
     "--samples", "4", "--seq-len", "16", "--max-tokens", "64"]
S = P + ["--eval-seq-len", "16"]
M = ["--model", "{model}", "--data", "{data}", "--device", "cpu", "--out", "{out}"]

ENTRIES = {"qalign": cli.main, "ptq-table": ptq_table.main, "same-budget": same_budget.main,
           "misalignment": misalignment.main}


def case(entry, argv, fix, *, id, out="new", loads="nothing", usage=False, marks=()):
    """One bad command line. fix: the fragment(s) of the message that say what to do.
    out: what --out is before the run (see `make_out`). loads: what may be loaded before the
    refusal ("nothing", "text" or "model"). usage: refused by argparse itself."""
    fixes = (fix,) if isinstance(fix, str) else fix
    return pytest.param(entry, argv, fixes, out, loads, usage, id=id, marks=marks)


PT = ["pretrain", "--data", "{data}", "--vocab-size", "300", "--seq-len", "16", "--out", "{out}"]
CLI_CASES = [
    # small-model pretraining and the training recipes
    case("qalign", PT + ["--size", "huge"], "use one of 1m, 3m, 8m, 20m", id="pretrain-size"),
    case("qalign", PT + ["--width", "8192", "--depth", "48"], "choose a smaller size",
         id="pretrain-too-big-for-memory"),
    case("qalign", PT + ["--tokens", "100"], "raise --tokens", id="pretrain-tokens-below-a-step"),
    case("qalign", PT + ["--branch-from", "{data}"], "is not a training checkpoint",
         id="pretrain-branch-from-not-a-checkpoint", loads="text"),
    case("qalign", ["recipe", "training-dynamics", "--out", "{out}", "--cooldown-at", "1.5"],
         "a cooldown cannot branch after the end of training", id="dynamics-branch-after-end"),
    case("qalign", ["recipe", "training-dynamics", "--out", "{out}", "--lawa-window", "40"],
         "shorten the window or lower checkpoint_every", id="dynamics-lawa-window"),
    case("qalign", ["recipe", "optimizer-choices", "--out", "{out}", "--variants",
                    "momentum=0.9"], "KEY one of ['dropout', 'grad_clip'",
         id="choices-unknown-factor"),
    # specs
    case("qalign", Q + ["--spec", "int9"], "write int{b}[-sym] (b in 2..8)", id="spec-int9"),
    case("qalign", Q + ["--spec", "int3-g0"], "-ch", id="spec-g0"),
    case("qalign", Q + ["--spec", "int3-g100"],
         ("model.layers.0.self_attn.q_proj", "use a divisor such as 32 or 64"),
         id="spec-g100-does-not-divide", loads="model"),
    case("qalign", Q + ["--spec", "e9m0"], "E must be in 1..8", id="spec-e9m0"),
    case("qalign", Q + ["--spec", "fp5"], "aliases fp4, fp8, fp16, bf16", id="spec-fp5"),
    case("qalign", Q + ["--spec", "int3-sym-sym"], "e.g. int3-g64", id="spec-sym-twice"),
    case("qalign", Q + ["--spec", ""], "e.g. int3-g64", id="spec-empty"),
    case("qalign", Q[:-2], "the following arguments are required: --spec", usage=True,
         id="spec-missing"),
    # methods and their options
    case("qalign", Q + ["--method", "nope"], "Register your own with @ptq.register_method",
         id="method-unknown"),
    case("qalign", Q + ["--method", "rtn", "--gptq-damp", "0.1"],
         "--gptq-damp: option(s) of method gptq", id="flag-of-another-method"),
    case("qalign", Q + ["--method", "gptq", "--rtn-clip-search"],
         "--rtn-clip-search: option(s) of method rtn", id="rtn-flag-with-gptq"),
    case("qalign", Q + ["--method", "gptq", "--gptq-damp", "-1"], "0.01 is usual",
         id="gptq-damp-negative"),
    case("qalign", Q + ["--method", "gptq", "--gptq-damp", "abc"], "give a finite number",
         usage=True, id="gptq-damp-not-a-number"),
    case("qalign", Q + ["--method", "gptq", "--gptq-block-size", "0"], "128 is usual",
         id="gptq-block-size-0"),
    case("qalign", Q + ["--method", "rtn", "--samples", "4"], "leave the flag(s) out",
         id="samples-with-rtn"),
    case("qalign", Q + ["--method", "gptq", "--propagate", "sideways"], "use quantized or fp",
         id="propagate-sideways"),
    case("qalign", Q + ["--method", "gptq", "--calib-batch-size", "0"],
         "--calib-batch-size 0: give 1 or more", id="calib-batch-size-0"),
    case("qalign", Q + ["--method", "gptq", "--seq-len", "1"], "--seq-len 1: give 2 or more",
         id="calib-seq-len-1"),
    case("qalign", E + ["--method", "gptq"], "need --spec", id="eval-method-without-spec"),
    # model and data
    case("qalign", Q + ["--model", "./no/such/dir"], "give an existing model folder",
         loads="model", id="model-no-such-dir"),
    case("qalign", Q + ["--model", "missing.gguf"], "give an existing model folder",
         loads="model", id="model-missing-gguf"),
    case("qalign", Q + ["--model", "{nocfg}"], "has no config.json; give a model folder",
         loads="model", id="model-without-config"),
    case("qalign", Q + ["--model", "{notok}"], "tokenizer.save_pretrained(folder)",
         loads="model", id="model-without-tokenizer"),
    case("qalign", Q + ["--model", "{nan}"], "check the checkpoint it was loaded from",
         loads="model", id="model-with-a-nan-weight"),
    case("qalign", E + ["--model", "{truncated}"], "re-export it with `qalign quantize`",
         loads="model", id="quantized-checkpoint-truncated"),
    case("qalign", E + ["--model", "{tampered}"], "re-export it with `qalign quantize`",
         loads="model", id="quantized-checkpoint-tampered"),
    case("qalign", Q + ["--method", "gptq", "--data", "no-such-file.txt"],
         "give the path of a UTF-8 text file", loads="text", id="data-no-such-file"),
    case("qalign", Q + ["--method", "gptq", "--data", "{dir}"], "give a text file in it",
         loads="text", id="data-is-a-folder"),
    case("qalign", Q + ["--method", "gptq", "--data", "{bin}"], "convert it, e.g. iconv",
         loads="text", id="data-binary"),
    case("qalign", E + ["--data", "{empty}"], "give a file with text in it", loads="text",
         id="data-empty"),
    case("qalign", E + ["--seq-len", "1"], "give an integer >= 2", usage=True, id="seq-len-1"),
    case("qalign", E + ["--seq-len", "4096"], "use --seq-len 2048 or less", loads="model",
         id="seq-len-beyond-positions"),
    case("qalign", E + ["--max-tokens", "0"], "give an integer >= 1", usage=True,
         id="max-tokens-0"),
    case("qalign", Q + ["--method", "gptq", "--samples", "100000", "--seq-len", "16"],
         "lower --samples or --seq-len, or give more text", loads="model",
         id="budget-larger-than-text"),
    case("qalign", Q + ["--method", "gptq", "--samples", "4", "--seq-len", "16", "--add-bos"],
         "set tokenizer.bos_token", loads="model", id="add-bos-without-bos-token"),
    case("qalign", E[:-1] + ["{out}"], "give a file path such as", out="sentinel",
         id="eval-json-is-a-folder"),
    # fine-tuning
    case("qalign", T + ["--lr", "inf"], "'inf' is not a finite number; give a finite number",
         usage=True, id="lr-inf"),
    case("qalign", T + ["--lr", "-1"], "must be positive and finite, e.g. 1e-5", id="lr-negative"),
    case("qalign", T + ["--lr", "nan"], "'nan' is not a finite number; give a finite number",
         usage=True, id="lr-nan"),
    case("qalign", T + ["--epochs", "0"], "epochs=0 must be >= 1", id="epochs-0"),
    case("qalign", T + ["--grad-clip", "-1"], "0 turns clipping off", id="grad-clip-negative"),
    case("qalign", T + ["--batch-size", "0"], "batch_size=0 must be >= 1", id="batch-size-0"),
    case("qalign", T + ["--warmup-steps", "-1"], "must be >= 0", id="warmup-negative"),
    case("qalign", T + ["--schedule", "nope"], "use one of ('constant', 'cosine', 'wsd')",
         id="schedule-unknown"),
    case("qalign", T + ["--mixed-precision", "fp32"], "use no, bf16 or fp16",
         id="mixed-precision-unknown"),
    case("qalign", T0 + ["--mode", "fp", "--spec", "int4"], "no --spec with --mode fp",
         id="fp-with-spec"),
    case("qalign", T0 + ["--mode", "qaft"], "give --spec with --mode qaft", id="qaft-without-spec"),
    case("qalign", T0 + ["--mode", "bogus"], "choose from 'qaft', 'lora', 'fp'", usage=True,
         id="mode-unknown"),
    case("qalign", T + ["--mode", "lora", "--scale-mode", "learned"],
         "--scale-mode: QAFT options do not apply to --mode lora", id="scale-mode-with-lora"),
    case("qalign", T + ["--lora-rank", "4"], "LoRA options do not apply to --mode qaft",
         id="lora-flag-with-qaft"),
    case("qalign", T + ["--init", "mse", "--scale-mode", "dynamic"],
         "use scale_mode fixed or learned", id="mse-init-dynamic-scales"),
    case("qalign", T + ["--mode", "lora", "--lora-init", "mse"], "use one of rtn, gptq",
         id="lora-init-mse"),
    case("qalign", T + ["--mode", "lora", "--lora-rank", "0"], "LoRA rank=0 must be >= 1",
         id="lora-rank-0"),
    case("qalign", T + ["--gptq-damp", "0.1"], "apply only with --init gptq",
         id="gptq-damp-without-gptq-init"),
    case("qalign", T + ["--max-steps", "3", "--epochs", "2"], "set one: epochs, or max_steps",
         id="two-budgets"),
    case("qalign", T + ["--batch-size", "8"], "lower --batch-size or raise --samples",
         id="batch-larger-than-budget"),
    case("qalign", T + ["--samples", "100000"], "lower --samples or --seq-len", loads="model",
         id="finetune-budget-larger-than-text"),
    case("qalign", T + ["--seq-len", "4096"], "use --seq-len 2048 or less", loads="model",
         id="finetune-seq-len-beyond-positions"),
    # outputs and devices
    case("qalign", Q, "give a folder path", out="file", id="out-is-a-file"),
    case("qalign", Q, "choose another path", out="under-file", id="out-under-a-file"),
    case("qalign", T, "choose another path", out="under-file", id="finetune-out-under-a-file"),
    case("qalign", Q, "is not writable; choose another path", out="readonly",
         id="out-in-a-read-only-folder", marks=NOT_ROOT),
    case("qalign", Q + ["--device", "tpu"], "use cpu, cuda, cuda:N or auto", out="sentinel",
         id="device-unknown"),
    case("qalign", Q + ["--device", "cuda"], "use --device cpu", out="sentinel",
         id="device-cuda-without-cuda", marks=NO_CUDA),
    case("qalign", T + ["--device", "cuda"], "use --device cpu", out="sentinel",
         id="finetune-cuda-without-cuda", marks=NO_CUDA),
    # recipes
    case("qalign", ["recipe", "nope"], "choose from", usage=True, id="recipe-unknown"),
    case("ptq-table", P, "use another --out, or --fresh", out="other-config",
         id="ptq-table-out-of-another-config"),
    case("ptq-table", P, "use another --out, or --fresh", out="damaged",
         id="ptq-table-out-damaged"),
    case("same-budget", S, "use another --out, or --fresh", out="other-config",
         id="same-budget-out-of-another-config"),
    case("misalignment", M, "use another --out, or --fresh", out="other-config",
         id="misalignment-out-of-another-config"),
    case("misalignment", M, "use another --out, or --fresh", out="damaged",
         id="misalignment-out-damaged"),
    case("ptq-table", P + ["--methods", "nope"], "Register your own with @ptq.register_method",
         id="ptq-table-method-unknown"),
    case("ptq-table", P + ["--bits", "9"], "(b in 2..8)", id="ptq-table-bits-9"),
    case("ptq-table", P + ["--granularity", "g100"], "use a divisor such as 32 or 64",
         out="sentinel", loads="model", id="ptq-table-g100"),
    case("ptq-table", P + ["--methods", "rtn", "--gptq-damp", "0.1"],
         "--gptq-damp: option(s) of method gptq", id="ptq-table-foreign-flag"),
    case("ptq-table", P + ["--max-tokens", "0"], "give an integer >= 1", usage=True,
         id="ptq-table-max-tokens-0"),
    case("qalign", ["recipe", "ptq-table"] + P + ["--seq-len", "1"],
         "--seq-len 1: give 2 or more", id="recipe-ptq-table-seq-len-1"),
    case("same-budget", S + ["--methods", "nope"], "invalid choice: 'nope' (choose from",
         usage=True, id="same-budget-method-unknown"),
    case("same-budget", S + ["--eval-seq-len", "1"], "give an integer >= 2", usage=True,
         id="same-budget-eval-seq-len-1"),
    case("same-budget", S + ["--lr", "nan"], "must be positive and finite, e.g. 1e-5",
         id="same-budget-lr-nan"),
    case("same-budget", S + ["--granularity", "g100"], "use a divisor such as 32 or 64",
         out="sentinel", loads="model", id="same-budget-g100"),
    case("misalignment", M + ["--lr", "nan"], "give a finite number", usage=True,
         id="misalignment-lr-nan"),
    case("misalignment", M + ["--landscape-t", "1", "nan"], "give a finite number", usage=True,
         id="misalignment-landscape-t-nan"),
    case("misalignment", M + ["--bits", "9"], "give integer widths from 2 to 8",
         id="misalignment-bits-9"),
    case("misalignment", M + ["--seeds", "0", "1", "0"], "give one or more distinct seeds",
         id="misalignment-duplicate-seeds"),
    case("misalignment", M + ["--seeds"], "give one or more distinct seeds",
         id="misalignment-empty-seeds"),
    case("misalignment", M + ["--preset", "nope"], "invalid choice: 'nope' (choose from",
         usage=True, id="misalignment-preset-unknown"),
    case("misalignment", M + ["--granularity", "g100", "--bits", "3"],
         "use a divisor such as 32 or 64", out="sentinel", loads="model",
         id="misalignment-g100"),
    case("misalignment", M + ["--device", "cuda"], "use --device cpu",
         id="misalignment-cuda-without-cuda", marks=NO_CUDA),
]


def terminal_lines(err: str) -> list[str]:
    """The lines stderr leaves on a terminal: a progress bar that was drawn and then cleared
    (tqdm's leave=False: text, then '\\r', blanks, '\\r') leaves nothing of its own."""
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    return [line for line in lines if line.strip()]


def snapshot(path):
    """{relative path: (is folder, size, mtime)} of a file or folder tree; None if absent."""
    if not os.path.lexists(path):
        return None

    def entry(p):
        st = os.stat(p)
        return (os.path.isdir(p), st.st_size, st.st_mtime_ns)
    tree = {".": entry(path)}
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            full = os.path.join(root, name)
            tree[os.path.relpath(full, path)] = entry(full)
    return tree


def make_out(kind: str, tmp_path):
    """(--out, the path whose tree must not change). new: nothing there; sentinel: a folder
    holding a file; file: a file; under-file: a path below a file; readonly: a path in a 0o555
    folder; other-config / damaged: a recipe folder whose results.json is of another config /
    not JSON."""
    out = tmp_path / "out"
    if kind == "new":
        return out, out
    if kind == "file":
        out.write_text("a file, not a folder")
        return out, out
    if kind == "under-file":
        (tmp_path / "a-file").write_text("a file, not a folder")
        return tmp_path / "a-file" / "sub", tmp_path / "a-file"
    if kind == "readonly":
        ro = tmp_path / "read-only"
        ro.mkdir()
        (ro / "sentinel.txt").write_text("keep")
        ro.chmod(0o555)
        return ro / "sub", ro
    out.mkdir()
    (out / "sentinel.txt").write_text("keep")
    if kind == "other-config":
        (out / "results.json").write_text(json.dumps({"config": {"recipe": "another"},
                                                      "rows": []}))
    elif kind == "damaged":
        (out / "results.json").write_text('{"config": {"recipe": "trunc')
    return out, out


def forbid_loading(monkeypatch, *, text: bool = True, model: bool = True) -> None:
    """The promise that configuration is checked before a model or text loads: every recipes
    module's load_text / load_model fails the test if called."""
    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"the command loaded a {what} before refusing its input")
        return fail

    for name, module in list(sys.modules.items()):
        if name.startswith("recipes.") and module is not None:
            if text and hasattr(module, "load_text"):
                monkeypatch.setattr(module, "load_text", refuse("text"))
            if model and hasattr(module, "load_model"):
                monkeypatch.setattr(module, "load_model", refuse("model"))


@pytest.mark.parametrize("entry,argv,fixes,out_kind,loads,usage", CLI_CASES)
def test_cli_refuses_bad_input(entry, argv, fixes, out_kind, loads, usage, files, tmp_path,
                               capsys, monkeypatch):
    out, watched = make_out(out_kind, tmp_path)
    values = {**files, "out": str(out)}
    argv = [a.format_map(values) for a in argv]
    forbid_loading(monkeypatch, text=loads == "nothing", model=loads in ("nothing", "text"))
    before = snapshot(watched)
    try:
        with pytest.raises(SystemExit) as exc:
            ENTRIES[entry](argv)
    finally:
        if out_kind == "readonly":
            watched.chmod(0o755)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = terminal_lines(err)
    if usage:  # argparse: its usage, then one error line
        assert lines[0].startswith("usage: "), err
        assert re.match(r"^\S.*: error: ", lines[-1]), err
        assert not any(": error: " in line for line in lines[:-1]), err
    else:
        assert len(lines) == 1 and lines[0].startswith("qalign: error: "), err
    for fix in fixes:
        assert fix in lines[-1], lines[-1]
    assert snapshot(watched) == before, f"{watched} changed"


def test_checkpoint_every_writes_into_out_and_a_rerun_is_refused(files, tmp_path, capsys):
    """--checkpoint-every keeps its checkpoints in OUT/checkpoints; running again into the same
    OUT without --resume, or resuming with another TrainConfig, is refused and changes nothing."""
    out = tmp_path / "ft"
    argv = ["finetune", "--model", files["model"], "--data", files["data"], "--device", "cpu",
            "--spec", "int4-g16", "--samples", "2", "--seq-len", "16", "--checkpoint-every", "1",
            "--out", str(out)]
    cli.main(argv)  # 2 steps of batch 1: checkpoints at steps 1 and 2, the last one kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert json.loads((out / "qalign-finetune.json").read_text())["steps"] == 2
    capsys.readouterr()
    for extra, fix in (([], "add --resume to continue it, or choose another --out"),
                       (["--resume", "--lr", "1e-3"], "resume with the same config")):
        before = snapshot(out)
        with pytest.raises(SystemExit) as exc:
            cli.main(argv + extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err
        assert len(terminal_lines(err)) == 1 and err.startswith("qalign: error: "), err
        assert fix in err, err
        assert snapshot(out) == before


# --- the recipe YAML (misalignment --config), through the CLI and load_config -------------------

YAML_CASES = [
    ("unknown-key", "bogus_key: 1\n", "known: ['add_bos'"),
    ("lr-nan", "lr: .nan\n", "lr: nan is not a finite number; give a finite number"),
    ("landscape-t-nan", "landscape_t: [.nan]\n", "give a finite number"),
    ("bits-9", "bits: [9]\n", "give integer widths from 2 to 8"),
    ("method-unknown", "methods: [nope]\n",
     "unknown ['nope']; known: ['block-ap', 'gptq', 'hqq', 'qaft'"),
    ("samples-fractional", "samples: 2.5\n", "give a whole number"),
    ("add-bos-not-bool", "add_bos: maybe\n", "give true or false"),
    ("a-list", "- bits\n- lr\n", "a recipe file is a mapping of config keys"),
    ("invalid-syntax", "bits: [3\n", "fix the file"),
    ("probe-beyond-eval", "probe_tokens: 8192\neval_tokens: 4096\n",
     "probe_tokens (8192) <= eval_tokens (4096)"),
    ("preset-unknown", "preset: nope\n", "known: ['paper', 'quick'"),
    ("variant-without-value", "gptq_variants: [damp]\n", "write KEY=VALUE"),
    ("granularity-unknown", "granularity: zz\n", "e.g. int3-g64"),
    ("not-utf8", b"\xff\xfe bits: [3]\n", "fix the file"),
]


def _yaml(tmp_path, name, content):
    path = tmp_path / f"{name}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("name,content,fix", YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_recipe_yaml_is_refused(name, content, fix, files, tmp_path, capsys, monkeypatch):
    path = _yaml(tmp_path, name, content)
    with pytest.raises(ptq.QalignError) as exc:
        load_config("quick", path)
    assert fix in str(exc.value)
    # and through the recipe's command line, before anything loads or is written
    forbid_loading(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        misalignment.main(["--config", str(path), "--model", files["model"], "--data",
                           files["data"], "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("qalign: error: ")
    assert len(terminal_lines(err)) == 1, err
    assert fix in err and not out.exists()


def test_missing_recipe_yaml_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        misalignment.main(["--config", str(tmp_path / "missing.yaml"), "--out",
                           str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("qalign: error: ")
    assert len(terminal_lines(err)) == 1, err
    assert "give" in err or "use" in err, err


# --- the library ----------------------------------------------------------------------------

def _tiny():
    return tiny_model("llama", vocab_size=64, seed=0)


BLOCKS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def _nan_model():
    model = _tiny()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = float("nan")
    return model


def _prepare_twice():
    model = _tiny()
    qaft.prepare(model, "int4")
    qaft.prepare(model, "int4")


LIBRARY_CASES = [
    ("gptq-without-calib", lambda f: ptq.quantize_model(_tiny(), "int4", "gptq"),
     ptq.QalignError, "pass calib=(n_samples, seq_len) token ids"),
    ("filter-matches-nothing",
     lambda f: ptq.quantize_model(_tiny(), "int4", "rtn", filter_fn=lambda m, n: False),
     ptq.QalignError, "leave it out"),
    ("group-does-not-divide", lambda f: ptq.quantize_model(_tiny(), "int3-g100", "rtn"),
     ptq.SpecError, "model.layers.0.self_attn.q_proj; use a divisor such as 32 or 64"),
    ("method-unknown", lambda f: ptq.quantize_model(_tiny(), "int4", "nope"),
     ptq.UnknownMethodError, "Register your own with @ptq.register_method"),
    ("options-of-another-method",
     lambda f: ptq.quantize_model(_tiny(), "int4", "rtn", ptq.GPTQOptions()),
     ptq.OptionsError, "takes RTNOptions"),
    ("options-unknown-key", lambda f: ptq.quantize_model(_tiny(), "int4", "rtn", {"nope": 1}),
     ptq.OptionsError, "known: ['clip_grid'"),
    ("propagate-unknown",
     lambda f: ptq.quantize_model(_tiny(), "int4", "gptq", calib=BLOCKS, propagate="x"),
     ptq.QalignError, "use 'quantized' or 'fp'"),
    ("calib-float", lambda f: ptq.quantize_model(_tiny(), "int4", "gptq", calib=BLOCKS.float()),
     ptq.QalignError, "token ids"),
    ("calib-1d", lambda f: ptq.quantize_model(_tiny(), "int4", "gptq", calib=BLOCKS[0]),
     ptq.QalignError, "(n_samples, seq_len)"),
    ("calib-out-of-vocab",
     lambda f: ptq.quantize_model(_tiny(), "int4", "gptq", calib=BLOCKS + 1000),
     ptq.QalignError, "vocab"),
    ("spec-empty", lambda f: ptq.parse_spec(""), ptq.SpecError, "e.g. int3-g64"),
    ("spec-none", lambda f: ptq.parse_spec(None), ptq.SpecError, "such as 'int4-g64'"),
    ("spec-int9", lambda f: ptq.parse_spec("int9"), ptq.SpecError, "(b in 2..8)"),
    ("spec-g0", lambda f: ptq.parse_spec("int3-g0"), ptq.SpecError, "-ch"),
    ("prepare-twice", lambda f: _prepare_twice(), ptq.OptionsError, "call qaft.convert"),
    ("prepare-gptq-without-solution",
     lambda f: qaft.prepare(_tiny(), "int4", qaft.QAFTConfig(init="gptq")),
     ptq.OptionsError, "pass solution={layer: QuantizedTensor}"),
    ("budget-no-samples", lambda f: DataBudget(0, 16), DataError, "need n_samples >= 1"),
    ("budget-larger-than-tokens", lambda f: DataBudget(100, 16).blocks(torch.arange(50)),
     DataError, "lower --samples or --seq-len, or give more text"),
    ("train-lr-inf", lambda f: qaft.TrainConfig(lr=float("inf")), ptq.OptionsError,
     "must be positive and finite, e.g. 1e-5"),
    ("train-lr-nan", lambda f: qaft.TrainConfig(lr=float("nan")), ptq.OptionsError,
     "must be positive and finite, e.g. 1e-5"),
    ("train-grad-clip-negative", lambda f: qaft.TrainConfig(grad_clip=-1), ptq.OptionsError,
     "0 turns clipping off"),
    ("train-two-budgets", lambda f: qaft.TrainConfig(max_steps=3, max_tokens=100),
     ptq.OptionsError, "set one: epochs, or max_steps, or max_tokens"),
    ("qaft-init-unknown", lambda f: qaft.QAFTConfig(init="nope"), ptq.OptionsError,
     "use one of rtn, mse, gptq"),
    ("qaft-gptq-dynamic", lambda f: qaft.QAFTConfig(init="gptq", scale_mode="dynamic"),
     ptq.OptionsError, "use scale_mode fixed or learned"),
    ("lora-rank-0", lambda f: qaft.LoraOptions(rank=0), ptq.OptionsError, "must be >= 1"),
    ("lora-init-mse", lambda f: qaft.LoraOptions(init="mse"), ptq.OptionsError,
     "use one of rtn, gptq"),
    ("qaft-gptq-options-without-gptq-init",
     lambda f: qaft.finetune_qaft(_tiny(), BLOCKS, "int4", gptq=ptq.GPTQOptions()),
     ptq.OptionsError, "use QAFTConfig(init='gptq') or leave gptq= out"),
    ("lora-gptq-options-without-gptq-init",
     lambda f: qaft.finetune_lora(_tiny(), BLOCKS, "int4", gptq=ptq.GPTQOptions()),
     ptq.OptionsError, "use LoraOptions(init='gptq') or leave gptq= out"),
    ("blocks-not-a-tensor",
     lambda f: qaft.finetune_qaft(_tiny(), [[1, 2, 3]], "int4", progress=False),
     ptq.OptionsError, "give a (n, seq_len) token tensor"),
    ("checkpoint-every-without-dir",
     lambda f: qaft.finetune_fp(_tiny(), BLOCKS, qaft.TrainConfig(checkpoint_every=2),
                                progress=False),
     ptq.OptionsError, "need checkpoint_dir="),
    ("batch-larger-than-blocks",
     lambda f: qaft.finetune_fp(_tiny(), BLOCKS, qaft.TrainConfig(batch_size=4), progress=False),
     ptq.OptionsError, "lower batch_size or give more blocks"),
    ("nan-weight", lambda f: ptq.quantize_model(_nan_model(), "int4", "rtn", progress=False),
     NonFiniteError, "check the checkpoint it was loaded from"),
    ("nan-weight-gptq", lambda f: ptq.quantize_model(_nan_model(), "int4", "gptq", calib=BLOCKS,
                                                     progress=False),
     NonFiniteError, "check the checkpoint it was loaded from"),
    ("nan-weight-qaft", lambda f: qaft.prepare(_nan_model(), "int4"), NonFiniteError,
     "check the checkpoint it was loaded from"),
    ("quantized-checkpoint-truncated", lambda f: load_model(f["truncated"]),
     ptq.QalignError, "re-export it with `qalign quantize`"),
    ("load-text-folder", lambda f: load_text(f["dir"]), DataError, "give a text file in it"),
    ("load-text-missing", lambda f: load_text("x.txt"), DataError,
     "give the path of a UTF-8 text file"),
    ("load-model-missing", lambda f: load_model("./no/such/dir"), ModelError,
     "give an existing model folder"),
    ("load-model-without-config", lambda f: load_model(f["nocfg"]), ModelError,
     "give a model folder written by save_pretrained"),
    ("load-model-without-tokenizer", lambda f: load_model(f["notok"]), ModelError,
     "tokenizer.save_pretrained(folder)"),
]


@pytest.mark.parametrize("fn,error,fix", [pytest.param(*row[1:4], id=row[0], marks=row[4:])
                                           for row in LIBRARY_CASES])
def test_library_refuses_bad_input(fn, error, fix, files):
    """row: (id, call, error type, fragment naming the fix, marks...)"""
    with pytest.raises(error) as exc:
        fn(files)
    assert isinstance(exc.value, ptq.QalignError)
    assert fix in str(exc.value), str(exc.value)
