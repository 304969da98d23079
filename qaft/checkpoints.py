"""Training checkpoints: written atomically, found by step, read back without unpickling code.

One checkpoint is a folder checkpoint_dir/step-000120/ holding
  model.safetensors  the model's state_dict (safetensors.torch.save_model, which stores tied or
                     shared tensors such as a tied lm_head once and restores the tie on load)
  state.pt           the torch state: optimizer, scheduler and grad-scaler state_dicts, RNG states
                     of every process, ids of the blocks seen (read with weights_only=True)
  train.json         everything else: the TrainConfig, step, tokens, data position, history rows
It is written into a hidden temporary folder and renamed into place with os.replace, so a run killed
while writing leaves the earlier checkpoints intact and never a half-written one under a step-*
name; the oldest beyond `keep` are removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

__all__ = ["checkpoint_steps", "latest_checkpoint", "save_checkpoint", "checkpoint_meta",
           "load_checkpoint", "rng_state", "set_rng_state"]

_NAME = re.compile(r"step-(\d+)")


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Optimizer steps of the complete checkpoints in `directory`, ascending."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if p.is_dir() and (m := _NAME.fullmatch(p.name)))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    steps = checkpoint_steps(directory)
    return Path(directory) / f"step-{steps[-1]:06d}" if steps else None


def save_checkpoint(directory: str | os.PathLike, step: int, model: nn.Module,
                    tensors: dict, meta: dict, keep: int = 1) -> Path:
    """Write checkpoint `step` (model weights, torch `tensors`, JSON `meta`) atomically; keep
    the last `keep` checkpoints."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():  # left by an earlier process with our pid that died while writing
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(tensors, tmp / "state.pt")
    # default=float: eval_fn may report numpy or 0-d tensor numbers
    (tmp / "train.json").write_text(json.dumps(meta, indent=1, default=float))
    if final.exists():
        # A resumed run redoes the steps after its checkpoint and may meet an older folder of
        # the same step; os.replace cannot replace a non-empty folder, so move it aside first.
        old = root / f".old-step-{step:06d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    for old_step in checkpoint_steps(root)[:-keep]:
        shutil.rmtree(root / f"step-{old_step:06d}")
    return final


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """The JSON part of the checkpoint at `path` (read it to check a run before loading)."""
    return json.loads((Path(path) / "train.json").read_text())


def load_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load the weights at `path` into `model` in place (strict); returns the torch state."""
    path = Path(path)
    load_model(model, str(path / "model.safetensors"), strict=True)
    return torch.load(path / "state.pt", weights_only=True)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG states that dropout draws from: the CPU's, and the accelerator's if any."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "mps" in state:
        torch.mps.set_rng_state(state["mps"])
