"""Whether a run may continue from a checkpoint: resumed as the same run, or branched as another.

A resumed run must have the checkpoint's TrainConfig, world size and data shape, so it ends with
the weights an uninterrupted run would have. A branch (a WSD cooldown from a stable-phase
checkpoint) may change only the schedule and budget fields and what is recorded or written, and
its learning rate must equal the parent's at every step before the branch point
(`qaft.schedules.first_lr_difference`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Callable

from ptq.errors import OptionsError

from .schedules import first_lr_difference

__all__ = ["check_resume", "check_branch", "SCHEDULE_FIELDS", "RECORD_FIELDS"]

SCHEDULE_FIELDS = ("schedule", "max_steps", "max_tokens", "epochs", "decay_fraction",
                   "decay_steps", "min_lr_ratio")
# fields that only say what is recorded or written: a branch may change them too
RECORD_FIELDS = ("checkpoint_every", "keep_checkpoints", "local_every", "eval_every",
                 "validate_every", "patience", "restore_best")


def _as_json(config) -> dict:
    return json.loads(json.dumps(asdict(config)))  # as the checkpoint's JSON stores it


def check_resume(meta: dict, config, world: int, source, path) -> None:
    """`config` (a TrainConfig) continues the run that wrote the checkpoint `meta` at `path`."""
    mine = _as_json(config)
    # a field the checkpoint lacks is newer than it: that run had the field's default behaviour
    theirs = {**_as_json(type(config)()), **meta["config"]}
    changed = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in mine.items()
               if theirs.get(k) != v]
    if changed:
        raise OptionsError(f"the checkpoint {path} was written under another TrainConfig ("
                           f"{'; '.join(changed)}); resume with the same config, or start a new "
                           "run in another checkpoint_dir")
    if meta["world_size"] != world or meta["data"] != [source.num_blocks, source.seq_len]:
        raise OptionsError(f"the checkpoint {path} was written by {meta['world_size']} process(es)"
                           f" on data {meta['data']} (blocks, seq_len); this run has {world} on "
                           f"{[source.num_blocks, source.seq_len]}; resume with the same ones")


def check_branch(meta: dict, config, world: int, source, path, total_steps: int,
                 total_steps_of: Callable) -> None:
    """`config` (total_steps long) may branch from the checkpoint `meta` at `path`;
    total_steps_of(parent config) is the parent run's length."""
    check_resume({**meta, "config": {**meta["config"], **{
        k: v for k, v in _as_json(config).items() if k in SCHEDULE_FIELDS + RECORD_FIELDS}}},
        config, world, source, path)
    parent = type(config)(**{**asdict(type(config)()), **meta["config"]})
    step = meta["step"]
    if step >= total_steps:
        raise OptionsError(f"the branch point {path} is at step {step}, at or after the end of "
                           f"this run ({total_steps} steps); give the branch a budget beyond "
                           "its branch point (max_steps = branch step + cooldown steps)")
    diverges = first_lr_difference(parent, total_steps_of(parent), config, total_steps, step)
    if diverges is not None:
        raise OptionsError(
            f"this run's learning rate at step {diverges} differs from that of the run it "
            f"branches from ({path}, step {step}): a branch must follow its parent's schedule "
            "up to the branch point; e.g. parent constant with warmup W, branch wsd with the "
            "same warmup, decay_steps D and max_steps = branch step + D")
