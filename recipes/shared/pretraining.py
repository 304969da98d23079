"""Small-model pretraining as a run: `pretrain` and `finished`.

`pretrain` trains a `qaft.pretrain` model on a text's train split with `qaft.train.finetune` (the
one training loop: schedules, WSD cooldown branches, mixed precision, seeded checkpoints and
resume), the split cut into consecutive blocks and cycled over as the token budget needs, then
writes a plain transformers folder (model, tokenizer, qalign-pretrain.json) that every qalign
command loads with --model OUT. Its checkpoints live in OUT/checkpoints/step-*/, where LAWA
(`qaft.averaging`) and cooldown branches read them. `qalign pretrain`
(`recipes.commands.pretrain`) and the training recipes call it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compare.data import TextSplits, tokenize
from compare.evaluate import evaluate_nll, heldout_windows
from compare.io import write_json
from ptq.errors import OptionsError
from qaft.checkpoints import checkpoint_meta
from qaft.fp_train import QTrainConfig, prepare_qtrain, restore_linears
from qaft.pretrain import (ModelConfig, build_model, check_memory, parameter_count, train_blocks,
                           unigram_nll)
from qaft.train import TrainConfig, TrainResult, finetune

__all__ = ["pretrain", "PretrainResult", "finished", "REPORT"]

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


