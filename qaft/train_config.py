"""The options of the training loop (`TrainConfig`) and what a run gives back (`TrainResult`).

`TrainConfig` is validated in `__post_init__`; its fields are described by their `help` metadata,
and the loop that runs it is `qaft.train.finetune` (see its module docstring for what each part
does). The names of the learning-rate schedules (`SCHEDULES`) live here with the config that
validates them; `qaft.schedules` computes them.

These are a module of their own so that the modules that read a config, `qaft.schedules` (the
learning rate of a step) and `qaft.continuation` (whether a checkpoint may be resumed or branched
from), need not import the loop that imports them: the imports run train -> schedules,
continuation -> train_config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ptq.errors import OptionsError

from .distill import LOSSES

__all__ = ["SCHEDULES", "TrainConfig", "TrainResult"]

SCHEDULES = ("constant", "cosine", "wsd")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate of AdamW"})
    epochs: int = field(default=1, metadata={
        "help": "passes over the token blocks; the budget unless max_steps or max_tokens is set "
                "(then leave it at 1)"})
    max_steps: int = field(default=0, metadata={
        "help": "budget in optimizer steps, cycling over the data as needed (0: use epochs)"})
    max_tokens: int = field(default=0, metadata={
        "help": "budget in tokens over all processes, rounded down to whole optimizer steps "
                "(0: use epochs)"})
    batch_size: int = field(default=1, metadata={"help": "blocks per process per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    schedule: str = field(default="constant", metadata={"help": "constant, cosine or wsd"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup optimizer steps"})
    decay_fraction: float = field(default=0.2, metadata={
        "help": "wsd: fraction of steps in the final linear decay"})
    decay_steps: int = field(default=0, metadata={
        "help": "wsd: steps of the final linear decay, instead of decay_fraction (0: use "
                "decay_fraction); a cooldown branch sets it"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "cosine/wsd: final learning rate as a fraction of the peak"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    decay_all_params: bool = field(default=False, metadata={
        "help": "apply weight decay to biases, norms, embeddings and LSQ scales too"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    mixed_precision: str = field(default="no", metadata={
        "help": "no, bf16 or fp16 autocast (fp16 with a gradient scaler; on a CPU fp16 matmuls "
                "run an order of magnitude slower than bf16)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order"})
    local_every: int = field(default=0, metadata={
        "help": "record each layer's local loss every k steps (0: never)"})
    eval_every: int = field(default=0, metadata={
        "help": "run eval_fn every k steps (0: never)"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "write a checkpoint to checkpoint_dir every k optimizer steps and at the end "
                "(0: only at the end)"})
    keep_checkpoints: int = field(default=1, metadata={
        "help": "how many of the latest checkpoints to keep"})
    loss: str = field(default="nll", metadata={
        "help": "nll (next-token NLL of the blocks) or kd (KL from the frozen FP model's "
                "next-token distributions on the same blocks; QAFT and LoRA keep a copy of the FP "
                "model as teacher: one more copy of the weights in memory)"})
    validate_every: int = field(default=0, metadata={
        "help": "run validate_fn at step 0, every k optimizer steps and at the last step, and "
                "keep the state of the best validation NLL (0: never)"})
    patience: int = field(default=0, metadata={
        "help": "stop after this many validations without improvement (0: never stop early; "
                "the best state is kept all the same)"})
    restore_best: bool = field(default=True, metadata={
        "help": "with validate_every: end with the state of the best validation (false: the "
                "last state; the best is recorded either way)"})

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise OptionsError(f"schedule={self.schedule!r}: use one of {SCHEDULES}")
        if self.loss not in LOSSES:
            raise OptionsError(f"loss={self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise OptionsError(f"mixed_precision={self.mixed_precision!r}: use no, bf16 or fp16")
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise OptionsError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("max_steps", "max_tokens", "warmup_steps", "decay_steps", "local_every",
                     "eval_every",
                     "checkpoint_every", "validate_every", "patience"):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name}={getattr(self, name)} must be >= 0 (0: "
                                   f"{'none' if name == 'warmup_steps' else 'off'})")
        budgets = [f"{n}={getattr(self, n)}" for n in ("max_steps", "max_tokens")
                   if getattr(self, n)]
        if self.epochs != 1:
            budgets.insert(0, f"epochs={self.epochs}")
        if len(budgets) > 1:
            raise OptionsError(f"{' and '.join(budgets)} each set the training budget; set one: "
                               "epochs, or max_steps, or max_tokens (leave max_steps and "
                               "max_tokens at 0 and epochs at 1 when unused)")
        # `not x > 0` also refuses NaN, which compares false with everything
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OptionsError(f"lr={self.lr} must be positive and finite, e.g. 1e-5")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise OptionsError(f"weight_decay={self.weight_decay} must be >= 0 and finite "
                               "(0: no decay)")
        if not self.grad_clip >= 0:
            raise OptionsError(f"grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise OptionsError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise OptionsError(f"decay_fraction={self.decay_fraction} must lie in (0, 1]")
        if self.patience and not self.validate_every:
            raise OptionsError(f"patience={self.patience} counts validations, and "
                               "validate_every=0 runs none; set validate_every (and pass "
                               "validate_fn), or leave patience at 0")


@dataclass
class TrainResult:
    history: list[dict]
    config: dict
    steps: int
    tokens_processed: int
    unique_tokens: int
    seconds: float  # wall time of the whole run, summed over its resumed parts
    world_size: int = 1
    resumed_from: int = 0  # the optimizer step a resumed or branched run started at
    # with validate_every: the step (0: before training) and value of the best validation, and
    # whether patience ran out before the budget did
    best_step: int | None = None
    best_val_nll: float | None = None
    stopped_early: bool = False
