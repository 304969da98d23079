"""Shared wiring of the CLI and the recipes: devices, versions, resume, weight snapshots."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from compare.io import read_json
from ptq.errors import OptionsError, QalignError
from ptq.layers import linear_weight, quantizable_linears, set_linear_weight

__all__ = ["ConfigError", "check_specs", "out_folder", "resolve_device", "versions", "finished_rows", "WeightSnapshot"]


class ConfigError(QalignError):
    """A recipe configuration that cannot run, with what to change."""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionsError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
        raise OptionsError(f"--device {name}: use cpu, cuda, cuda:N or auto")
    return name


def out_folder(path: str) -> Path:
    """A folder the command may write: not an existing file, its parent writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OptionsError(f"--out {out} is a file; give a folder path")
    parent = out if out.exists() else next((q for q in out.parents if q.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise OptionsError(f"--out {out}: {parent} is not writable; choose another folder")
    return out


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("qalign", "torch", "transformers", "accelerate", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["cpu_threads"] = torch.get_num_threads()
    return out


def finished_rows(results_path, config: dict, fresh: bool) -> list[dict]:
    """Rows a previous run of the same config left in results_path (resume), else []. A file
    from another config is an error rather than something silently mixed in or overwritten."""
    previous = None if fresh else read_json(results_path)
    if previous is None:
        return []
    if previous["config"] != config:
        raise ConfigError(f"{results_path} holds results of another config; use another --out, "
                          "or --fresh to discard them")
    return previous["rows"]


def check_specs(model: nn.Module, specs, filter_fn=None) -> None:
    """Every spec against every selected layer's width, before anything expensive runs."""
    from ptq.formats import parse_spec
    from ptq.layers import select_linears

    layers = select_linears(model, filter_fn)
    for spec in specs:
        spec = parse_spec(spec)
        for name, module in layers:
            spec.check_shape(linear_weight(module).shape[1], name)


class WeightSnapshot:
    """A copy of the selected layers' weights, so one loaded model can be quantized many times."""

    def __init__(self, model: nn.Module, filter_fn=None):
        self.layers = list(quantizable_linears(model, filter_fn))
        self.saved = [linear_weight(m).detach().clone() for _, m in self.layers]

    def restore(self) -> None:
        for (_, module), w in zip(self.layers, self.saved):
            set_linear_weight(module, w)
