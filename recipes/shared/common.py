"""Shared wiring of the CLI and the recipes: devices, versions, resume, weight snapshots."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from compare.io import read_json
from ptq.errors import OptionsError, QalignError
from ptq.layers import linear_weight, quantizable_linears, set_linear_weight

__all__ = ["ConfigError", "at_least", "check_specs", "out_folder", "out_file", "previous_results",
           "resolve_device",
           "versions", "finished_rows", "WeightSnapshot", "run_or_exit"]


class ConfigError(QalignError):
    """A recipe configuration that cannot run, with what to change."""


def at_least(kind, low):
    """An argparse type: a `kind` (int or float) number >= low; NaN is refused too."""
    what = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; give {what} >= {low}"
                                             ) from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{text} is too small; give {what} >= {low}")
        return value
    return parse


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionsError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
        raise OptionsError(f"--device {name}: use cpu, cuda, cuda:N or auto")
    return name


def _check_writable(out: Path, flag: str, folder: Path) -> None:
    """`out` can be written: the nearest existing one of `folder` (the folder `out` is or goes
    into) and its ancestors is a folder this process may write in."""
    folder = folder.absolute()
    parent = next(q for q in (folder, *folder.parents) if q.exists())
    if not parent.is_dir():
        raise OptionsError(f"{flag} {out}: {parent} is a file, so nothing can be written under "
                           "it; choose another path")
    if not os.access(parent, os.W_OK):
        raise OptionsError(f"{flag} {out}: {parent} is not writable; choose another path")


def out_folder(path: str, flag: str = "--out") -> Path:
    """A folder the command may write: not an existing file, not under a file, writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OptionsError(f"{flag} {out} is a file; give a folder path")
    _check_writable(out, flag, out)
    return out


def out_file(path: str, flag: str) -> Path:
    """A file the command may (re)write at the end: not a folder, not under a file, writable."""
    out = Path(path)
    if out.is_dir():
        raise OptionsError(f"{flag} {out} is a folder; give a file path such as {out / 'x.json'}")
    _check_writable(out, flag, out.parent)
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


def previous_results(path, config: dict, fresh: bool, is_ours, extends=None) -> dict | None:
    """The results a previous run of the same config left at `path` (resume), or None. A file
    that `is_ours(obj)` rejects (damaged, foreign) or that holds another config is an error
    rather than something silently mixed in or overwritten, unless `extends(old, new)` says the
    new config only adds units to the old one (the caller then records the change)."""
    damaged = (f"{path} is not a results file of this recipe (damaged, or written by something "
               "else); use another --out, or --fresh to replace it")
    try:
        previous = None if fresh else read_json(path)
    except ValueError:  # not JSON, or not UTF-8
        raise ConfigError(damaged) from None
    if previous is None:
        return None
    if not isinstance(previous, dict) or not is_ours(previous):
        raise ConfigError(damaged)
    if previous.get("config") != config and not (extends and extends(previous.get("config"),
                                                                        config)):
        raise ConfigError(f"{path} holds results of another config; use another --out, or "
                          "--fresh to discard them")
    return previous


def finished_rows(results_path, config: dict, fresh: bool) -> list[dict]:
    """Rows a previous run of the same config left in results_path (resume), else []."""
    previous = previous_results(results_path, config, fresh,
                                lambda obj: {"config", "rows"} <= obj.keys())
    return [] if previous is None else previous["rows"]


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


def run_or_exit(fn, args):
    """fn(args); a QalignError (any mistake in the input) becomes one line on stderr, exit 2."""
    try:
        return fn(args)
    except QalignError as e:
        print(f"qalign: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
