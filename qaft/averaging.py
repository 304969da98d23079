"""Weight averaging: LAWA over the latest checkpoints of one run, uniform soups of runs.

LAWA (Kaddour 2022, "Stop wasting my time!", arXiv 2209.14981; used by paper A,
arXiv 2510.06213) replaces the weights at step t by the uniform mean of the last L checkpoints
at or before t, which smooths the stable-phase noise that a learning-rate cooldown otherwise
removes. A uniform soup (Wortsman et al. 2022, arXiv 2203.05482) averages the final weights of
several runs that share an initialisation or a parent checkpoint (e.g. cooldown branches).
Averages are computed in float64 and cast back to each tensor's dtype; integer buffers must agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ptq.errors import OptionsError

from .checkpoints import checkpoint_steps

__all__ = ["average_state_dicts", "lawa_steps", "lawa", "soup", "load_average"]


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform mean of state dicts with the same keys and shapes."""
    if not states:
        raise OptionsError("nothing to average: give at least one state dict")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise OptionsError(f"state {i} has other tensors than state 0 "
                               f"({sorted(set(s) ^ set(keys))[:3]}...); average checkpoints of "
                               "one architecture")
    out = {}
    for k in keys:
        first = states[0][k]
        if any(s[k].shape != first.shape for s in states):
            raise OptionsError(f"{k} has different shapes across the states; average "
                               "checkpoints of one architecture")
        if not first.is_floating_point():
            if any(not torch.equal(s[k], first) for s in states):
                raise OptionsError(f"the integer tensor {k} differs across the states and "
                                   "cannot be averaged")
            out[k] = first.clone()
            continue
        total = torch.zeros(first.shape, dtype=torch.float64)
        for s in states:
            total += s[k].double()
        out[k] = (total / len(states)).to(first.dtype)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def lawa_steps(checkpoint_dir: str | os.PathLike, window: int, at: int | None = None) -> list[int]:
    """The steps of the last `window` checkpoints at or before step `at` (default: the last)."""
    if window < 1:
        raise OptionsError(f"window={window} must be >= 1")
    steps = [s for s in checkpoint_steps(checkpoint_dir) if at is None or s <= at]
    if len(steps) < window:
        raise OptionsError(f"LAWA over {window} checkpoints needs {window}, and {checkpoint_dir} "
                           f"keeps {len(steps)} at or before step {at if at is not None else 'the end'}"
                           "; shorten the window, or train with more kept checkpoints "
                           "(keep_checkpoints) and a smaller checkpoint_every")
    return steps[-window:]


def lawa(checkpoint_dir: str | os.PathLike, window: int, at: int | None = None
         ) -> dict[str, torch.Tensor]:
    """The LAWA weights at step `at`: the mean of the last `window` checkpoints up to it."""
    root = Path(checkpoint_dir)
    return average_state_dicts([_weights(root / f"step-{s:06d}")
                                for s in lawa_steps(root, window, at)])


def soup(model_dirs: list[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """The uniform soup of saved models (folders with model.safetensors)."""
    if len(model_dirs) < 2:
        raise OptionsError(f"a soup averages several runs; got {len(model_dirs)}")
    return average_state_dicts([_weights(Path(d)) for d in model_dirs])


def load_average(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load averaged weights into `model` in place. safetensors stores a tied tensor once, so a
    tied lm_head may be absent from `state`; any other missing or extra tensor is an error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing
            if model.get_parameter(k) is model.get_input_embeddings().weight}
    if unexpected or set(missing) - tied:
        raise OptionsError(f"the averaged weights do not fit this model (missing "
                           f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    return model
