"""Flags that several `qalign` subcommands share: the model, the evaluation windows, BOS, and
the compute dtype said once in the log."""

from __future__ import annotations

import argparse

from compare.dtypes import describe_dtype_choice, resolve_dtype
from compare.models import fit_seq_len
from recipes.shared.common import at_least, resolve_device
from recipes.shared.quantization import DEFAULT_SEQ_LEN

__all__ = ["DEFAULT_SEQ_LEN", "model_args", "eval_args", "bos_arg", "compute_dtype",
           "seq_len_for"]


def model_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
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


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wiki",
                   help="'wiki' (embedded), a text file, or hf:NAME[:CONFIG] (default: wiki)")
    p.add_argument("--seq-len", type=at_least(int, 2), default=None,
                   help=f"evaluation window, and calibration block length (default: "
                        f"{DEFAULT_SEQ_LEN}, or the model's positions when it has fewer)")
    p.add_argument("--max-tokens", type=at_least(int, 1), default=16384,
                   help="held-out tokens evaluated (default: 16384)")
    p.add_argument("--batch-size", type=at_least(int, 1), default=2,
                   help="windows per forward (default: 2)")
    bos_arg(p)


def bos_arg(p) -> None:
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every window and block with BOS (default: the tokenizer's own "
                        "convention, i.e. whether it adds BOS when encoding)")


def compute_dtype(args):
    """The compute dtype --dtype names on --device, said once in the log."""
    device = resolve_device(args.device)
    print(f"qalign: {describe_dtype_choice(args.dtype, device)}", flush=True)
    return resolve_dtype(args.dtype, device)


def seq_len_for(model, seq_len: int | None) -> int:
    """--seq-len for this model: as given (None: the flag was left out), or the default capped at
    the model's positions, said in one line."""
    given = seq_len is not None
    chosen, note = fit_seq_len(model, seq_len if given else DEFAULT_SEQ_LEN, given)
    if note:
        print(f"qalign: {note}", flush=True)
    return chosen
