"""The `qalign` command line: prepare, quantize, eval, finetune, methods, pretrain, fp-law,
recipe.

    qalign prepare                      # embedded model and text, offline
    qalign quantize --spec int3-g64 --method gptq --out runs/gptq-int3
    qalign eval --model runs/gptq-int3
    qalign methods                      # every registered PTQ method, plug-ins included
    qalign pretrain --size 1m --tokens 200000 --out runs/tiny   # a small model of our own
    qalign fp-law --bits 8 --params 1e9 --block 128             # paper C's law
    qalign recipe misalignment --preset quick --out results/misalignment

Every command validates its whole configuration (spec, options, output folder, device) before it
loads a model or any text; a mistake is one `qalign: error: ...` line naming the fix (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from compare.data import budget_blocks, load_text
from compare.evaluate import evaluate_nll, heldout_windows
from compare.io import read_json, write_csv, write_json
from compare.dtypes import describe_dtype_choice, resolve_dtype
from compare.models import EMBEDDED_MODELS, check_seq_len, load_model, prepare_embedded
from ptq.allocator import tune_allocator
from ptq.checkpoint import save_quantized
from ptq.export import check_compressed_tensors_spec, save_compressed_tensors
from ptq.errors import OptionsError, QalignError
from ptq.formats import parse_spec
from recipes import (fp_scaling, misalignment, optimizer_choices, ptq_table, same_budget,
                     training_dynamics)
from recipes.common import at_least, out_file, out_folder, resolve_device, versions
from recipes.flags import given_fields
from recipes.fp_law import add_law_flags, cmd_fp_law
from recipes.pretrain import add_pretrain_flags, cmd_pretrain
from recipes.finetune import add_finetune_flags, check_finetune_run, finetune_setup, run_finetune
from recipes.quantization import (CalibConfig, add_calib_flags, add_method_flags, calib_config,
                                  layer_table, method_options, run_ptq)

RECIPES = {"misalignment": misalignment, "ptq-table": ptq_table, "same-budget": same_budget,
           "training-dynamics": training_dynamics, "optimizer-choices": optimizer_choices,
           "fp-scaling": fp_scaling}


def _model_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name, local model folder, local .gguf file or hub id "
                        "(default: smollm2-135m)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own Python code to run (off by default)")
    if dtype:
        p.add_argument("--dtype", default="auto",
                       help="compute dtype of the model's forward passes: auto (bfloat16 on "
                            "CPUs with AMX/AVX512-BF16 and CUDA GPUs with bf16, else float32), "
                            "float32 or bfloat16; Hessians, GPTQ and scales stay float32 "
                            "(default: auto)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wiki",
                   help="'wiki' (embedded), a text file, or hf:NAME[:CONFIG] (default: wiki)")
    p.add_argument("--seq-len", type=at_least(int, 2), default=512,
                   help="evaluation window, and calibration block length (default: 512)")
    p.add_argument("--max-tokens", type=at_least(int, 1), default=16384,
                   help="held-out tokens evaluated (default: 16384)")
    p.add_argument("--batch-size", type=at_least(int, 1), default=2,
                   help="windows per forward (default: 2)")
    _bos_arg(p)


def _bos_arg(p) -> None:
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every window and block with BOS (default: the tokenizer's own "
                        "convention, i.e. whether it adds BOS when encoding)")


def _source_label(model: str) -> dict:
    """What a --model folder holds, from the report qalign wrote next to it (else FP)."""
    for name in ("qalign-quant.json", "qalign-finetune.json"):
        report = read_json(Path(model) / name) if Path(model).is_dir() else None
        if report is not None:
            method = report.get("method") or report.get("mode")
            return {"method": method, "spec": report.get("spec")}
    return {"method": "fp", "spec": None}


def _dtype(args):
    """The compute dtype --dtype names on --device, said once in the log."""
    device = resolve_device(args.device)
    print(f"qalign: {describe_dtype_choice(args.dtype, device)}", flush=True)
    return resolve_dtype(args.dtype, device)


def cmd_prepare(args) -> None:
    names = list(EMBEDDED_MODELS) if args.model == "all" else [args.model]
    for name in names:
        path = prepare_embedded(name, force=args.force)
        print(f"model {name}: {path}")
    splits = load_text(args.data)
    print(f"text {splits.name}: train {len(splits.train):,} chars, "
          f"held-out {len(splits.heldout):,} chars")


def cmd_quantize(args) -> None:
    spec = parse_spec(args.spec)
    options = method_options(args, [args.method])[args.method]
    calib = calib_config(args, args.method)
    out = out_folder(args.out)
    dtype = _dtype(args)
    if args.export == "compressed-tensors":  # refuse what the format cannot hold before work
        check_compressed_tensors_spec(spec)
        if out.exists():
            raise OptionsError(f"--out {out} exists; an export writes a new folder: choose "
                               "another path")
    device = resolve_device(args.device)
    text = load_text(args.data) if calib is not None else None
    model, tokenizer = load_model(args.model, device=device, dtype=dtype,
                                  trust_remote_code=args.trust_remote_code)
    if calib is not None:
        check_seq_len(model, calib.seq_len)
    res, budget = run_ptq(model, tokenizer, text, spec, args.method, options, calib,
                          add_bos=args.add_bos)
    if args.export == "compressed-tensors":
        save_compressed_tensors(model, res.quantized, out, tokenizer=tokenizer)
    else:
        save_quantized(model, res.quantized, out, {"method": args.method,
                                                   "source_model": args.model})
        tokenizer.save_pretrained(out)
    report = {"source_model": args.model, **res.to_dict(), "budget": budget,
              "versions": versions()}
    write_json(out / "qalign-quant.json", report)
    write_csv(out / "layers.csv", report["layers"])
    print(layer_table(report["layers"]))
    print(f"{args.method} {spec}: {len(res.layers)} layers in {res.seconds:.1f} s -> {out}")


def cmd_eval(args) -> None:
    spec = parse_spec(args.spec) if args.spec else None
    if spec is None:  # the model is evaluated as loaded: method and calibration flags are moot
        method_options(args, [])
        if args.method != "rtn" or set(given_fields(CalibConfig, args)) - {"seq_len"}:
            raise OptionsError("--method and calibration flags need --spec (without it the "
                               "model is evaluated as loaded)")
        options = calib = None
    else:
        options = method_options(args, [args.method])[args.method]
        calib = calib_config(args, args.method, seq_len=args.seq_len)
    if args.json:
        out_file(args.json, "--json")
    device = resolve_device(args.device)
    dtype = _dtype(args)
    text = load_text(args.data)  # once: calibration (train split) and evaluation (held-out)
    model, tokenizer = load_model(args.model, device=device, dtype=dtype,
                                  trust_remote_code=args.trust_remote_code)
    check_seq_len(model, args.seq_len)
    label = _source_label(args.model)
    if spec is not None:
        res, _ = run_ptq(model, tokenizer, text, spec, args.method, options, calib,
                         add_bos=args.add_bos)
        label = {"method": args.method if label["method"] == "fp"
                 else f"{label['method']}+{args.method}", "spec": str(spec)}
        print(f"{args.method} {spec}: {len(res.layers)} layers in {res.seconds:.1f} s")
    windows, bos_id = heldout_windows(tokenizer, text, args.seq_len, args.max_tokens,
                                      args.add_bos)
    result = evaluate_nll(model, windows, batch_size=args.batch_size, bos_id=bos_id)
    row = {"model": args.model, "data": args.data, **label, "dtype": str(dtype).split(".")[-1],
           **result.to_dict()}
    print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}, indent=1))
    if args.json:
        write_json(args.json, row)


def cmd_finetune(args) -> None:
    setup = finetune_setup(args)
    spec = str(parse_spec(args.spec)) if args.spec else None
    if (setup.mode == "fp") != (spec is None):
        raise OptionsError("give --spec with --mode qaft or lora, and no --spec with --mode fp")
    out = out_folder(args.out)
    device = resolve_device(args.device)
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len, seed=args.budget_seed)
    checkpoints = out / "checkpoints" if setup.train.checkpoint_every or args.resume else None
    check_finetune_run(setup, device, args.samples, checkpoints, args.resume)
    text = load_text(args.data)
    model, tokenizer = load_model(args.model, device=device,
                                  trust_remote_code=args.trust_remote_code)
    check_seq_len(model, args.seq_len)
    blocks = budget_blocks(tokenizer, text, calib.budget, args.add_bos)
    res = run_finetune(model, blocks, spec, setup, checkpoint_dir=checkpoints,
                       resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: every rank holds the same result
        return
    if res.codes is None:
        res.model.save_pretrained(out)
    else:
        save_quantized(res.model, res.codes, out, {"method": setup.mode,
                                                   "source_model": args.model})
    tokenizer.save_pretrained(out)
    train = res.train
    write_json(out / "qalign-finetune.json", {
        "source_model": args.model, "spec": spec, **res.info,
        "budget": {"data": args.data, **asdict(calib.budget),
                   "unique_tokens": calib.budget.unique_tokens},
        "steps": train.steps, "tokens_processed": train.tokens_processed,
        "unique_tokens": train.unique_tokens, "train_seconds": train.seconds,
        "history": train.history, "versions": versions()})
    print(f"{setup.mode} {spec or 'fp'}: {train.steps} steps, {train.tokens_processed:,} tokens "
          f"({train.unique_tokens:,} unique), final loss {train.history[-1]['loss']:.4f}, "
          f"{res.info['seconds']:.0f} s -> {out}")


def method_table() -> dict:
    """Every registered method (kind, whether it needs data, options and defaults, the package it
    came from) and the plug-ins that failed to load, with their errors."""
    import dataclasses

    from ptq.registry import PLUGIN_ERRORS, available_methods

    rows = []
    for name, m in sorted(available_methods().items()):
        options = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                   for f in dataclasses.fields(m.options)}
        rows.append({"name": name, "kind": m.kind, "needs_data": m.needs_data,
                     "source": m.source, "options": options,
                     "search_space": {k: list(v) for k, v in m.search_space.items()}})
    return {"methods": rows, "failed_plugins": dict(sorted(PLUGIN_ERRORS.items()))}


def cmd_methods(args) -> None:
    table = method_table()
    if args.json:
        print(json.dumps(table, indent=1, default=str))
        return
    rows = table["methods"]
    w_name = max([len("method"), *(len(r["name"]) for r in rows),
                  *map(len, table["failed_plugins"])])
    w_from = max([len("from"), *(len(r["source"]) for r in rows)])
    print(f"{'method':<{w_name}}  {'kind':<5}  {'data':<4}  {'from':<{w_from}}  options (defaults)")
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        print(f"{r['name']:<{w_name}}  {r['kind']:<5}  {'yes' if r['needs_data'] else 'no':<4}  "
              f"{r['source']:<{w_from}}  {opts}")
    for name, why in table["failed_plugins"].items():
        print(f"{name:<{w_name}}  FAILED to load: {why}")


def _plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="import a .py file or a module that registers PTQ methods before "
                        "anything else (repeatable); installed packages register through the "
                        "qalign.methods entry points without it")


def load_user_plugins(argv) -> None:
    """Import the --plugin targets of argv, so that their methods (and their option flags) exist
    when the parser is built."""
    from ptq.registry import load_plugin

    pre = argparse.ArgumentParser(add_help=False)
    _plugin_arg(pre)
    for target in pre.parse_known_args(argv)[0].plugin:
        load_plugin(target)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qalign", description="Local vs global loss of quantized LMs.")
    _plugin_arg(p)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="convert the embedded model and check the embedded text",
                       description="Convert the embedded GGUF model to fp32 safetensors in the "
                                   "cache (once) and load the embedded text.")
    s.add_argument("--model", default="smollm2-135m",
                   help=f"embedded model, or 'all' (have: {', '.join(EMBEDDED_MODELS)})")
    s.add_argument("--data", default="wiki", help="text source to check (default: wiki)")
    s.add_argument("--force", action="store_true", help="convert again even if cached")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize every linear layer of the decoder blocks and save "
                                   "the model (safetensors) with a qalign-quant.json report.")
    _model_args(s)
    add_method_flags(s, spec_required=True)
    s.add_argument("--data", default="wiki",
                   help="calibration text: 'wiki', a text file or hf:NAME[:CONFIG] (default: wiki)")
    add_calib_flags(s)
    _bos_arg(s)
    s.add_argument("--export", choices=["qalign", "compressed-tensors"], default="qalign",
                   help="checkpoint format: qalign (packed codes, every grid, read by qalign) or "
                        "compressed-tensors (pack-quantized integer grids; transformers loads it "
                        "with the compressed-tensors package) (default: qalign)")
    s.add_argument("--out", required=True, help="output model folder")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("eval", help="held-out NLL and perplexity of a model",
                       description="Mean token NLL / perplexity on held-out text; with --spec, "
                                   "of the model quantized on the fly.")
    _model_args(s)
    _eval_args(s)
    add_method_flags(s)
    add_calib_flags(s, exclude=("seq_len",))  # calibration blocks are --seq-len long
    s.add_argument("--json", help="also write the result to this JSON file")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("finetune", help="QAFT / LoRA / FP fine-tuning on a PTQ data budget",
                       description="Fine-tune on exactly the token blocks PTQ calibrates on "
                                   "(--samples x --seq-len of the train split) and save the "
                                   "result (packed codes, or plain safetensors for --mode fp).")
    _model_args(s, dtype=False)  # fp32 weights; --mixed-precision bf16 for bf16 compute
    s.add_argument("--spec", help="quantization spec (not with --mode fp)")
    s.add_argument("--data", default="wiki",
                   help="training text: 'wiki', a text file or hf:NAME[:CONFIG] (default: wiki)")
    s.add_argument("--samples", type=at_least(int, 1), default=128,
                   help="budget: number of token blocks (default: 128)")
    s.add_argument("--seq-len", type=at_least(int, 2), default=512,
                   help="budget: block length (default: 512)")
    s.add_argument("--budget-seed", type=int, default=0,
                   help="seed of the block draw, as PTQ's --seed (default: 0)")
    add_finetune_flags(s)
    s.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in OUT/checkpoints (written every "
                        "--checkpoint-every steps): same data order, same final weights")
    _bos_arg(s)
    s.add_argument("--out", required=True, help="output model folder")
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("methods", help="list every registered PTQ method",
                       description="Every registered PTQ method, built-in or from a plug-in "
                                   "(entry-point group qalign.methods): its kind (layer or "
                                   "block), whether it calibrates, its options with defaults, "
                                   "and the package it came from; plug-ins that failed to load "
                                   "are listed with their error.")
    s.add_argument("--json", action="store_true", help="print the table as JSON")
    s.set_defaults(fn=cmd_methods)

    s = sub.add_parser("pretrain", help="train a small Llama model and its tokenizer",
                       description="Train a byte-level BPE tokenizer and a small Llama model "
                                   "(~1M to ~20M parameters) on the train split, and save both "
                                   "as a model folder that every qalign command loads.")
    add_pretrain_flags(s)
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("fp-law", help="paper C's scaling law for a format, N, D and B",
                       description="Predicted loss, best exponent/mantissa split and critical "
                                   "data size of floating-point quantized training (Sun et al. "
                                   "2025), with the published constants.")
    add_law_flags(s)
    s.set_defaults(fn=cmd_fp_law)

    s = sub.add_parser("recipe", help="run an experiment recipe",
                       description="Run a recipe; `qalign recipe NAME --help` lists its flags.")
    rsub = s.add_subparsers(dest="recipe", required=True)
    for name, module in RECIPES.items():
        r = rsub.add_parser(name, help=module.__doc__.split("\n")[0],
                            description=module.__doc__.split("\n")[0])
        module.build_parser(r)
        r.set_defaults(fn=lambda a, m=module: m.run(a))
    return p


def run_or_exit(fn, args):
    """fn(args); a QalignError (any mistake in the input) becomes one line on stderr, exit 2."""
    try:
        return fn(args)
    except QalignError as e:
        print(f"qalign: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    tune_allocator()  # freed activations reused, not faulted in again (ptq.allocator)
    run_or_exit(load_user_plugins, argv)
    args = build_parser().parse_args(argv)
    run_or_exit(args.fn, args)


if __name__ == "__main__":
    main()
