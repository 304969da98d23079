"""`qalign pretrain`: its flags and the command, around `recipes.shared.pretraining.pretrain`.

    qalign pretrain --size 1m --tokens 200000 --lr 3e-3 --schedule cosine --out runs/tiny
    qalign eval --model runs/tiny
    qalign quantize --model runs/tiny --spec int4-g64 --method gptq --out runs/q

Flags map 1:1 onto `qaft.pretrain.ModelConfig` (`--size`, `--width`, `--dropout`, ...) and
`qaft.TrainConfig` (`--lr`, `--schedule`, `--weight-decay`, `--grad-clip`, `--mixed-precision`,
...); the budget is `--tokens`. The tokenizer is trained on the train split of --data unless
`--tokenizer FOLDER` names one to reuse (runs meant to be compared share one).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from compare.data import load_text
from compare.models import load_tokenizer
from ptq.errors import OptionsError
from qaft.pretrain import ModelConfig, check_memory, train_tokenizer
from qaft.train import TrainConfig
from recipes.shared.common import at_least, out_folder
from recipes.shared.flags import add_dataclass_flags, from_args
from recipes.shared.pretraining import finished, pretrain

__all__ = ["add_pretrain_flags", "cmd_pretrain", "train_config", "PRETRAIN_TRAIN_DEFAULTS"]


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
