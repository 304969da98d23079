"""Small-model pretraining as a run (`pretrain`) and its command line (`qalign pretrain`).

`pretrain` trains a `qaft.pretrain` model on a text's train split with `qaft.train.finetune` (the
one training loop: schedules, WSD cooldown branches, mixed precision, seeded checkpoints and
resume), the split cut into consecutive blocks and cycled over as the token budget needs, then
writes a plain transformers folder (model, tokenizer, qalign-pretrain.json) that every qalign
command loads with --model OUT. Its checkpoints live in OUT/checkpoints/step-*/, where LAWA
(`qaft.averaging`) and cooldown branches read them. The training recipes call it too.

    qalign pretrain --size 1m --tokens 200000 --lr 3e-3 --schedule cosine --out runs/tiny
    qalign eval --model runs/tiny --seq-len 128
    qalign quantize --model runs/tiny --spec int4-g64 --method gptq --seq-len 128 --out runs/q

Flags map 1:1 onto `qaft.pretrain.ModelConfig` (`--size`, `--width`, `--dropout`, ...) and
`qaft.TrainConfig` (`--lr`, `--schedule`, `--weight-decay`, `--grad-clip`, `--mixed-precision`,
...); the budget is `--tokens`. The tokenizer is trained on the train split of --data unless
`--tokenizer FOLDER` names one to reuse (runs meant to be compared share one).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from compare.data import TextSplits, load_text, tokenize
from compare.evaluate import evaluate_nll, heldout_windows
from compare.io import write_json
from compare.models import load_tokenizer
from ptq.errors import OptionsError
from qaft.checkpoints import checkpoint_meta
from qaft.fp_train import QTrainConfig, prepare_qtrain, restore_linears
from qaft.pretrain import (ModelConfig, build_model, check_memory, parameter_count,
                           train_blocks, train_tokenizer, unigram_nll)
from qaft.train import TrainConfig, TrainResult, finetune
from recipes.common import at_least, out_folder
from recipes.flags import add_dataclass_flags, from_args

__all__ = ["pretrain", "PretrainResult", "finished", "REPORT", "add_pretrain_flags",
           "cmd_pretrain", "train_config", "PRETRAIN_TRAIN_DEFAULTS"]

REPORT = "qalign-pretrain.json"

@dataclass
class PretrainResult:
    out: Path
    parameters: int
    train: TrainResult
    epochs: float  # passes over the train split the token budget made
    heldout_nll: float  # nats per token on the held-out split's first eval_tokens
    unigram_nll: float  # the add-one unigram model's on the same tokens


def pretrain(out: str | os.PathLike, text: TextSplits, tokenizer, model_cfg: ModelConfig,
             train_cfg: TrainConfig, *, resume: bool = False,
             branch_from: str | os.PathLike | None = None, eval_fn=None,
             eval_tokens: int = 16384, progress: bool = True,
             qtrain: QTrainConfig | None = None, extra: dict | None = None,
             train_tokens: torch.Tensor | None = None,
             windows: torch.Tensor | None = None) -> PretrainResult:
    """Train `model_cfg`'s model on text.train as `train_cfg` says (its max_tokens or max_steps
    is the budget) and write OUT as a transformers model folder with its tokenizer and
    qalign-pretrain.json (configs, history, parameters, seconds, the held-out NLL on eval_tokens
    tokens of text.heldout beside the unigram model's, and `extra`).

    Checkpoints go to OUT/checkpoints; resume continues the latest; branch_from starts at another
    run's checkpoint with this schedule (see qaft.train). eval_fn(model) -> float or dict is
    recorded every train_cfg.eval_every steps. qtrain: quantized training (paper C,
    `qaft.fp_train`): the decoder blocks' linear layers compute with rounded GEMM inputs; the
    saved model is plain, and heldout_nll is measured as trained (forward rounding on) with
    heldout_nll_plain beside it. train_tokens (text.train tokenized) and windows (its held-out
    windows) spare a caller with many runs on one text the tokenization of each."""
    out = Path(out)
    if train_cfg.epochs != 1 or not (train_cfg.max_tokens or train_cfg.max_steps):
        raise OptionsError("pretraining is budgeted in tokens or steps: set max_tokens (or "
                           "max_steps) and leave epochs at 1")
    step_tokens = train_cfg.batch_size * train_cfg.grad_accum * model_cfg.seq_len
    steps = train_cfg.max_steps or train_cfg.max_tokens // step_tokens
    if branch_from is not None:  # before anything is written (qaft.train checks the rest)
        if not (Path(branch_from) / "train.json").is_file():
            raise OptionsError(f"branch_from={branch_from} is not a training checkpoint (no "
                               "train.json); give a step-* folder of a run's checkpoints")
        at = checkpoint_meta(branch_from)["step"]
        if at >= steps:
            raise OptionsError(f"the branch point {branch_from} is at step {at}, at or after "
                               f"the end of this run ({steps} steps of {step_tokens} tokens); "
                               "give the branch a budget beyond its branch point")
    if train_tokens is None:
        train_tokens = tokenize(tokenizer, text.train)
    if windows is None:
        windows, _ = heldout_windows(tokenizer, text, model_cfg.seq_len, eval_tokens)
    blocks = train_blocks(train_tokens, model_cfg.seq_len)
    check_memory(model_cfg, train_cfg.batch_size)
    model = build_model(model_cfg, tokenizer)
    params = parameter_count(model)
    if qtrain is not None:
        prepare_qtrain(model, qtrain)
    epochs = steps * step_tokens / blocks.numel()
    if epochs > 1 and progress:
        print(f"qaft.pretrain: {steps * step_tokens:,} tokens are {epochs:.2f} epochs of the "
              f"{blocks.numel():,}-token train split of {text.name}; a larger text (a file or "
              "hf: dataset) gives more unique tokens", flush=True)
    tokenizer.save_pretrained(out)  # first, so that a resumed run finds the same tokenizer
    result = finetune(model, blocks, train_cfg, checkpoint_dir=out / "checkpoints",
                      resume=resume, branch_from=branch_from, eval_fn=eval_fn,
                      progress=progress)
    heldout = evaluate_nll(model, windows, batch_size=8, progress=False).nll
    plain = {}
    if qtrain is not None:
        restore_linears(model)
        plain = {"qtrain": asdict(qtrain), "heldout_nll_plain": evaluate_nll(
            model, windows, batch_size=8, progress=False).nll}
    model.save_pretrained(out)
    unigram = unigram_nll(blocks, windows, len(tokenizer))
    report = {"model": asdict(model_cfg), "shape": asdict(model_cfg.shape), "parameters": params,
              "train": asdict(train_cfg), "text": text.name, "train_tokens": blocks.numel(),
              "epochs": epochs, "steps": result.steps, "tokens_processed": result.tokens_processed,
              "seconds": result.seconds, "heldout_nll": heldout, "unigram_nll": unigram,
              "eval_tokens": windows.numel(), "branched_from": None if branch_from is None
              else str(branch_from), "history": result.history, **plain, **(extra or {})}
    write_json(out / REPORT, report)  # last: its presence marks a finished run
    return PretrainResult(out, params, result, epochs, heldout, unigram)


def finished(out: str | os.PathLike) -> dict | None:
    """The report of a finished pretraining run in `out`, or None."""
    path = Path(out) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


# What pretraining sets differently from fine-tuning's defaults
PRETRAIN_TRAIN_DEFAULTS = dict(lr=3e-3, batch_size=16, schedule="cosine", warmup_steps=20,
                               weight_decay=0.1, checkpoint_every=50)
# Fields that make no sense for pretraining from scratch (the budget is --tokens)
_NOT_FOR_PRETRAINING = ("epochs", "max_steps", "max_tokens", "loss", "local_every",
                        "eval_every", "validate_every", "patience", "restore_best")


def add_pretrain_flags(p: argparse.ArgumentParser) -> None:
    add_dataclass_flags(p.add_argument_group("model"), ModelConfig)
    add_dataclass_flags(p.add_argument_group("training"), TrainConfig,
                        exclude=_NOT_FOR_PRETRAINING, defaults=PRETRAIN_TRAIN_DEFAULTS)
    p.add_argument("--tokens", type=at_least(int, 1), default=200_000,
                   help="training budget in tokens, cycling over the train split as needed "
                        "(default: 200000)")
    p.add_argument("--checkpoint-tokens", type=at_least(int, 1),
                   help="write a checkpoint every this many tokens (rounded down to whole "
                        "optimizer steps), instead of --checkpoint-every steps")
    p.add_argument("--data", default="wiki",
                   help="training text: 'wiki' (embedded), a text file or hf:NAME[:CONFIG] "
                        "(default: wiki)")
    p.add_argument("--tokenizer", help="a tokenizer folder to reuse (default: train one on "
                                       "the train split)")
    p.add_argument("--eval-tokens", type=at_least(int, 1), default=16384,
                   help="held-out tokens of the final evaluation (default: 16384)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in OUT/checkpoints")
    p.add_argument("--branch-from",
                   help="a checkpoint folder (RUN/checkpoints/step-*) to start from, e.g. a WSD "
                        "cooldown: --schedule wsd --decay-steps D --tokens up to the branch "
                        "point's plus D steps")
    p.add_argument("--out", required=True, help="output model folder")


def train_config(args, seq_len: int) -> TrainConfig:
    """TrainConfig from the flags, pretraining's defaults under them, budget from --tokens,
    checkpoints every --checkpoint-tokens if given."""
    cfg = from_args(TrainConfig, args, **{
        **{k: v for k, v in PRETRAIN_TRAIN_DEFAULTS.items() if not hasattr(args, k)},
        "max_tokens": args.tokens})
    if args.checkpoint_tokens is None:
        return cfg
    if hasattr(args, "checkpoint_every"):
        raise OptionsError("--checkpoint-every and --checkpoint-tokens both set the checkpoint "
                           "interval; give one")
    step_tokens = cfg.batch_size * cfg.grad_accum * seq_len
    if args.checkpoint_tokens < step_tokens:
        raise OptionsError(f"--checkpoint-tokens {args.checkpoint_tokens} is less than one "
                           f"optimizer step of {step_tokens} tokens; raise it")
    return replace(cfg, checkpoint_every=args.checkpoint_tokens // step_tokens)


def cmd_pretrain(args) -> None:
    model_cfg = from_args(ModelConfig, args)
    train_cfg = train_config(args, model_cfg.seq_len)
    out = out_folder(args.out)
    if finished(out) is not None and not args.resume:
        raise OptionsError(f"{out} holds a finished pretraining run; choose another --out")
    step_tokens = train_cfg.batch_size * train_cfg.grad_accum * model_cfg.seq_len
    if args.tokens < step_tokens:
        raise OptionsError(f"--tokens {args.tokens} is less than one optimizer step of "
                           f"{step_tokens} tokens (--batch-size x --grad-accum x --seq-len); "
                           "raise --tokens")
    check_memory(model_cfg, train_cfg.batch_size)
    text = load_text(args.data)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif (out / "tokenizer.json").is_file():  # a resumed run keeps its own
        tokenizer = load_tokenizer(str(out))
    elif args.branch_from and (Path(args.branch_from).parents[1] / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(str(Path(args.branch_from).parents[1]))  # the parent run's
    else:
        tokenizer = train_tokenizer(text.train, model_cfg.vocab_size)
    res = pretrain(out, text, tokenizer, model_cfg, train_cfg, resume=args.resume,
                   branch_from=args.branch_from, eval_tokens=args.eval_tokens)
    t = res.train
    print(f"{model_cfg.size if not model_cfg.width else 'custom'} model, "
          f"{res.parameters / 1e6:.2f}M parameters: {t.tokens_processed:,} tokens "
          f"({res.epochs:.2f} epochs) in {t.seconds:.0f} s "
          f"({t.tokens_processed / max(t.seconds, 1e-9):,.0f} tokens/s)")
    print(f"held-out NLL {res.heldout_nll:.4f} (unigram model {res.unigram_nll:.4f}) -> {out}")
