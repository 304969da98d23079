"""Learning-rate schedules of the fine-tuning loop, as a multiplier of the peak rate.

Every schedule starts with `warmup_steps` of linear warmup, (step + 1) / warmup_steps, then:
  constant  1
  cosine    lo + (1 - lo) * (1 + cos(pi * p)) / 2, p = (step - warmup) / (total - warmup)
  wsd       warmup, stable at 1, then a linear decay to lo over the last D steps,
            D = decay_steps or round(decay_fraction * total) (Hu et al. 2024, MiniCPM,
            arXiv 2404.06395); the last step's factor is exactly lo
with lo = min_lr_ratio. `total` is the run's number of optimizer steps, whichever budget (epochs,
max_steps or max_tokens) set it.

A WSD cooldown branch is a run that follows a constant (or WSD) run up to a saved stable-phase
checkpoint at step s and then decays over D steps: schedule wsd, decay_steps D, total s + D, the
same warmup. Its factors at steps < s equal the parent's, which `qaft.train` checks
(`first_lr_difference`) before it branches.
"""

from __future__ import annotations

import math

from .train_config import SCHEDULES, TrainConfig  # SCHEDULES: the names TrainConfig accepts

__all__ = ["SCHEDULES", "lr_factor", "first_lr_difference"]


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warmup, stable, decay
    decay_steps = cfg.decay_steps or max(round(cfg.decay_fraction * total), 1)
    start = total - decay_steps
    if step < start:
        return 1.0
    return lo + (1 - lo) * (1 - (step - start + 1) / decay_steps)


def first_lr_difference(parent: TrainConfig, parent_total: int, child: TrainConfig,
                        child_total: int, steps: int) -> int | None:
    """The first step < `steps` where the two schedules' learning rates differ, or None when
    they agree on all of them (a branch at step `steps` then continues the parent exactly)."""
    for step in range(steps):
        if parent.lr * lr_factor(step, parent_total, parent) != \
                child.lr * lr_factor(step, child_total, child):
            return step
    return None
