"""The loss landscape around the FP weights W: the NLL along W + t D for a direction D of all
selected layers moved together (`nll_along`), a seeded Gaussian direction with given per-layer
norms (`random_direction`), and the radius at which the NLL along one such direction first
reaches a limit (`random_radius`). Losses are in nats per scored token (compare.evaluate).
"""

from __future__ import annotations

import torch
from torch import nn

from .solutions import _nll, swapped_weights

__all__ = ["nll_along", "random_direction", "random_radius"]


def nll_along(model: nn.Module, windows: torch.Tensor, fp_weights: dict[str, torch.Tensor],
              direction: dict[str, torch.Tensor], ts: list[float], *, batch_size: int = 2
              ) -> list[float]:
    """NLL at W + t D for each t (all layers of `direction` moved together)."""
    out = []
    for t in ts:
        moved = {n: fp_weights[n].float() + t * direction[n].float() for n in direction}
        with swapped_weights(model, moved):
            out.append(_nll(model, windows, batch_size))
    return out


def random_direction(norms: dict[str, float], shapes: dict[str, torch.Size], seed: int
                     ) -> dict[str, torch.Tensor]:
    """A Gaussian direction with ||D_l|| = norms[l] per layer; the same seed gives the same D."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in norms:
        r = torch.randn(shapes[n], generator=g)
        out[n] = r * (norms[n] / float(r.norm().clamp_min(1e-30)))
    return out


def random_radius(model: nn.Module, windows: torch.Tensor, fp_weights: dict[str, torch.Tensor],
                  limit: float, *, seed: int, batch_size: int = 2, start: float = 0.01,
                  max_radius: float = 4.0, bisections: int = 4) -> dict:
    """The relative radius r = relative_norm(D, W) at which the NLL along one random direction
    (||D_l|| proportional to ||W_l||) first reaches `limit`: doubling from `start`, then
    bisection. {"radius": r or None (not reached up to max_radius), "points": [[r, nll], ...]}."""
    unit = random_direction({n: float(w.norm()) for n, w in fp_weights.items()},
                            {n: w.shape for n, w in fp_weights.items()}, seed)
    points = []

    def nll_at(r):
        value = nll_along(model, windows, fp_weights, unit, [r], batch_size=batch_size)[0]
        points.append([r, value])
        return value

    lo, hi = 0.0, start
    while nll_at(hi) < limit:
        lo, hi = hi, 2 * hi
        if hi > max_radius:
            return {"radius": None, "points": points}
    for _ in range(bisections):
        mid = (lo + hi) / 2
        if nll_at(mid) < limit:
            lo = mid
        else:
            hi = mid
    return {"radius": (lo + hi) / 2, "points": sorted(points)}
