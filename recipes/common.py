"""Shared wiring of the CLI and the recipes: devices, versions, held-out windows, snapshots."""

from __future__ import annotations

import platform
from importlib import metadata

import torch
from torch import nn

from compare.data import load_text, tokenize
from compare.io import read_json
from compare.evaluate import eval_windows
from ptq.apply import linear_weight, quantizable_linears, set_linear_weight

__all__ = ["resolve_device", "versions", "heldout_windows", "finished_rows", "WeightSnapshot"]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible; use --device cpu")
    return name


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("qalign", "torch", "transformers", "accelerate", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["cpu_threads"] = torch.get_num_threads()
    return out


def heldout_windows(tokenizer, data: str, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    splits = load_text(data)
    return eval_windows(tokenize(tokenizer, splits.heldout), seq_len, max_tokens)


def finished_rows(results_path, config: dict, fresh: bool) -> list[dict]:
    """Rows a previous run of the same config left in results_path (resume), else []. A file
    from another config is an error rather than something silently mixed in or overwritten."""
    previous = None if fresh else read_json(results_path)
    if previous is None:
        return []
    if previous["config"] != config:
        raise SystemExit(f"{results_path} holds results of another config "
                         f"({previous['config']}); use another --out, or --fresh to discard them")
    return previous["rows"]


class WeightSnapshot:
    """A copy of the selected layers' weights, so one loaded model can be quantized many times."""

    def __init__(self, model: nn.Module, filter_fn=None):
        self.layers = list(quantizable_linears(model, filter_fn))
        self.saved = [linear_weight(m).detach().clone() for _, m in self.layers]

    def restore(self) -> None:
        for (_, module), w in zip(self.layers, self.saved):
            set_linear_weight(module, w)
