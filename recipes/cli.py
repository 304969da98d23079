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
import sys
from importlib import metadata

from compare.models import EMBEDDED_MODELS
from ptq.allocator import tune_allocator
from recipes import (fp_scaling, misalignment, optimizer_choices, ptq_table, same_budget,
                     training_dynamics)
from recipes.commands.args import DEFAULT_SEQ_LEN, bos_arg, eval_args, model_args
from recipes.commands.evaluate import cmd_eval
from recipes.commands.finetune import add_finetune_flags, cmd_finetune
from recipes.commands.fp_law import add_law_flags, cmd_fp_law
from recipes.commands.methods import cmd_methods
from recipes.commands.prepare import cmd_prepare
from recipes.commands.pretrain import add_pretrain_flags, cmd_pretrain
from recipes.commands.quantize import cmd_quantize
from recipes.shared.common import at_least, run_or_exit
from recipes.shared.quantization import add_calib_flags, add_method_flags

RECIPES = {"misalignment": misalignment, "ptq-table": ptq_table, "same-budget": same_budget,
           "training-dynamics": training_dynamics, "optimizer-choices": optimizer_choices,
           "fp-scaling": fp_scaling}


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


def _version() -> str:
    try:
        return metadata.version("qalign")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qalign", description="Local vs global loss of quantized LMs.")
    p.add_argument("--version", action="version", version=f"qalign {_version()}",
                   help="print qalign's version and exit")
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
    model_args(s)
    add_method_flags(s, spec_required=True)
    s.add_argument("--data", default="wiki",
                   help="calibration text: 'wiki', a text file or hf:NAME[:CONFIG] (default: wiki)")
    add_calib_flags(s)
    bos_arg(s)
    s.add_argument("--export", choices=["qalign", "compressed-tensors"], default="qalign",
                   help="checkpoint format: qalign (packed codes, every grid, read by qalign) or "
                        "compressed-tensors (pack-quantized integer grids; transformers loads it "
                        "with the compressed-tensors package) (default: qalign)")
    s.add_argument("--out", required=True, help="output model folder")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("eval", help="held-out NLL and perplexity of a model",
                       description="Mean token NLL / perplexity on held-out text; with --spec, "
                                   "of the model quantized on the fly.")
    model_args(s)
    eval_args(s)
    add_method_flags(s)
    add_calib_flags(s, exclude=("seq_len",))  # calibration blocks are --seq-len long
    s.add_argument("--json", help="also write the result to this JSON file")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("finetune", help="QAFT / LoRA / FP fine-tuning on a PTQ data budget",
                       description="Fine-tune on exactly the token blocks PTQ calibrates on "
                                   "(--samples x --seq-len of the train split) and save the "
                                   "result (packed codes, or plain safetensors for --mode fp).")
    model_args(s, dtype=False)  # fp32 weights; --mixed-precision bf16 for bf16 compute
    s.add_argument("--spec", help="quantization spec (not with --mode fp)")
    s.add_argument("--data", default="wiki",
                   help="training text: 'wiki', a text file or hf:NAME[:CONFIG] (default: wiki)")
    s.add_argument("--samples", type=at_least(int, 1), default=128,
                   help="budget: number of token blocks (default: 128)")
    s.add_argument("--seq-len", type=at_least(int, 2), default=None,
                   help=f"budget: block length (default: {DEFAULT_SEQ_LEN}, or the model's "
                        "positions when it has fewer)")
    s.add_argument("--budget-seed", type=int, default=0,
                   help="seed of the block draw, as PTQ's --seed (default: 0)")
    add_finetune_flags(s)
    s.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in OUT/checkpoints (written every "
                        "--checkpoint-every steps): same data order, same final weights")
    bos_arg(s)
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


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    tune_allocator()  # freed activations reused, not faulted in again (ptq.allocator)
    run_or_exit(load_user_plugins, argv)
    args = build_parser().parse_args(argv)
    run_or_exit(args.fn, args)


if __name__ == "__main__":
    main()
