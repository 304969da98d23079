"""Learning-rate schedules of the fine-tuning loop, as a multiplier of the peak rate.

Every schedule starts with `warmup_steps` of linear warmup, (step + 1) / warmup_steps, then:
  constant  1
  cosine    lo + (1 - lo) * (1 + cos(pi * p)) / 2, p = (step - warmup) / (total - warmup)
  wsd       warmup, stable at 1, then a linear decay to lo over the last
            round(decay_fraction * total) steps (Hu et al. 2024, MiniCPM, arXiv 2404.06395)
with lo = min_lr_ratio. `total` is the run's number of optimizer steps, whichever budget (epochs,
max_steps or max_tokens) set it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("constant", "cosine", "wsd")


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
    decay_steps = max(round(cfg.decay_fraction * total), 1)  # wsd: warmup, stable, decay
    start = total - decay_steps
    if step < start:
        return 1.0
    return lo + (1 - lo) * (1 - (step - start + 1) / decay_steps)
