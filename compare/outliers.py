"""Activation outlier statistics from forward hooks (paper D, Ahmadian et al. 2023, arXiv
2305.19268; the threshold 6 follows LLM.int8, Dettmers et al. 2022, arXiv 2208.07339).

For every selected linear layer, over all tokens of the given windows, of the layer's input X:
  max_abs       max |X|
  outlier_dims  input features j whose max over tokens of |X_tj| reaches `threshold`
  kurtosis      Pearson kurtosis of all entries, m4 / m2^2 (3 for a Gaussian; heavy tails and
                outlier features make it large), from float64 running moment sums
  tokens        how many token rows were seen
`summarize` reduces them over layers (max of max_abs, total outlier dims, mean and max
kurtosis).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ptq.layers import FilterFn, select_linears

__all__ = ["activation_outliers", "summarize", "OUTLIER_THRESHOLD"]

OUTLIER_THRESHOLD = 6.0


class _Moments:
    """Running per-feature max |x| and float64 sums of x, x^2, x^3, x^4 over all entries."""

    def __init__(self):
        self.amax, self.n, self.tokens = None, 0, 0
        self.sums = torch.zeros(4, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        amax = x.abs().amax(dim=0)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.sums += torch.stack([x.sum(), (x ** 2).sum(), (x ** 3).sum(), (x ** 4).sum()])
        self.n += x.numel()
        self.tokens += x.shape[0]

    def result(self, threshold: float) -> dict:
        s1, s2, s3, s4 = (v / self.n for v in self.sums.tolist())
        var = s2 - s1 * s1
        m4 = s4 - 4 * s1 * s3 + 6 * s1 * s1 * s2 - 3 * s1 ** 4  # fourth central moment
        return {"max_abs": float(self.amax.max()),
                "outlier_dims": int((self.amax >= threshold).sum()),
                "kurtosis": m4 / (var * var) if var > 0 else math.nan,
                "tokens": self.tokens}


@torch.no_grad()
def activation_outliers(model: nn.Module, windows: torch.Tensor, *,
                        threshold: float = OUTLIER_THRESHOLD, batch_size: int = 8,
                        filter_fn: FilterFn | None = None) -> dict[str, dict]:
    """{layer name: statistics} of the selected linear layers' inputs on `windows`."""
    layers = select_linears(model, filter_fn)
    stats = {name: _Moments() for name, _ in layers}
    handles = [module.register_forward_pre_hook(lambda m, args, s=stats[name]: s.add(args[0]))
               for name, module in layers]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in windows.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: s.result(threshold) for name, s in stats.items()}


def summarize(per_layer: dict[str, dict]) -> dict:
    """Over layers: the largest |x|, the total outlier features, mean and max kurtosis."""
    k = [v["kurtosis"] for v in per_layer.values() if math.isfinite(v["kurtosis"])]
    return {"max_abs": max(v["max_abs"] for v in per_layer.values()),
            "outlier_dims": sum(v["outlier_dims"] for v in per_layer.values()),
            "mean_kurtosis": sum(k) / len(k) if k else math.nan,
            "max_kurtosis": max(k) if k else math.nan}
