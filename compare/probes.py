"""Model-level measurements of the alignment study, on one set of held-out probe windows.

A *solution* is the set of weights W_hat a method gives the selected linear layers; everything is
measured against the FP weights W of the same layers (`fp_weights`, (out, in) tensors):
  - `heldout_hessians`: H_l = 2/m X_l^T X_l of each layer on the probe windows, FP model (once);
  - `probe`: for the model as it stands, the mean NLL on the probe windows; each layer's local
    loss with FP inputs (from H_l) and with the inputs the model itself feeds the layer (propagated
    through the already quantized layers, measured by a forward hook); ||dW|| / ||W||; and, with
    grad=True, the cosine between d NLL / d W_hat and the local-loss gradient, per layer;
  - `one_layer_sensitivity`: the NLL increase when only one layer holds its quantized weight;
  - `nll_along`, `random_direction`, `random_radius`: the loss along W + t D.
Losses are in nats per scored token (compare.evaluate protocol), local losses are the ratio of
ptq.metrics.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.layers import linear_weight, set_linear_weight
from ptq.hessian import HessianAccumulator
from ptq.metrics import (output_error_sums, relative_output_error_from_hessian,
                         relative_output_error_grad)
from qaft.fake_quant import FakeQuantLinear

from .alignment import cosine, relative_norm
from .evaluate import evaluate_nll, token_nll

__all__ = ["solution_weights", "swapped_weights", "heldout_hessians", "probe",
           "one_layer_sensitivity", "nll_along", "random_direction", "random_radius"]


def _weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight the module computes with: the fake-quantized one under QAFT."""
    if isinstance(module, FakeQuantLinear):
        return module.quantized_weight()
    return linear_weight(module)


@torch.no_grad()
def solution_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: (out, in) weight the layer computes with}, detached copies."""
    return {n: _weight(model.get_submodule(n)).detach().clone() for n in names}


@contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Hold `weights` in the named plain linear layers inside the block, then put the old back."""
    modules = {n: model.get_submodule(n) for n in weights}
    saved = {n: linear_weight(m).detach().clone() for n, m in modules.items()}
    try:
        for n, m in modules.items():
            set_linear_weight(m, weights[n])
        yield model
    finally:
        for n, m in modules.items():
            set_linear_weight(m, saved[n])


@torch.no_grad()
def heldout_hessians(model: nn.Module, windows: torch.Tensor, names: list[str], *,
                     batch_size: int = 2) -> dict[str, torch.Tensor]:
    """{name: H (in, in) float32} of each layer's inputs when the model reads `windows`. Layers
    that read the same tensor (q/k/v, gate/up) share one H object."""
    device = next(model.parameters()).device
    accs: dict[str, HessianAccumulator] = {}
    first_reader: dict[int, str] = {}  # id(input) -> first layer that read it, this batch
    alive: list[torch.Tensor] = []  # keeps this batch's inputs alive so ids stay unique

    def hook(module, args, out, name):
        x = args[0]
        leader = first_reader.get(id(x))
        if leader is not None and leader != name:
            accs.setdefault(name, accs[leader])
            return
        first_reader[id(x)] = name
        alive.append(x)
        accs.setdefault(name, HessianAccumulator(x.shape[-1], device)).update(x)

    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    try:
        for batch in windows.split(batch_size):
            first_reader.clear()
            alive.clear()
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    shared: dict[int, torch.Tensor] = {}
    return {n: shared.setdefault(id(accs[n]), accs[n].H.float()) for n in names}


def probe(model: nn.Module, windows: torch.Tensor, fp_weights: dict[str, torch.Tensor],
          hessians: dict[str, torch.Tensor], *, grad: bool = False, batch_size: int = 2) -> dict:
    """Global and local losses of the model as it stands (module docstring).

    Returns {"nll", "local_fp_mean", "local_prop_mean", "distance", "layers": {name: {...}}};
    the means are over layers; distance is relative_norm over all layers.
    """
    device = next(model.parameters()).device
    names = list(fp_weights)
    modules = {n: model.get_submodule(n) for n in names}
    with torch.no_grad():
        W = {n: fp_weights[n].to(device).float() for n in names}
        W_hat = {n: _weight(modules[n]).detach().float() for n in names}
        dW = {n: W_hat[n] - W[n] for n in names}
    err = dict.fromkeys(names, 0.0)
    energy = dict.fromkeys(names, 0.0)

    moved = {n for n in names if bool(dW[n].any())}

    def hook(module, args, out, name):
        # A float32 layer's own output (less its bias) is X W_hat^T, so one extra GEMM, X W^T,
        # gives both terms; a lower-precision output would round the difference away, so there
        # X dW^T is computed. An unmoved layer has no error: its ratio stays 0.
        if name not in moved:
            return
        y_hat = None
        if out.dtype == torch.float32:
            y_hat = out.detach() if module.bias is None else out.detach() - module.bias.detach()
        e, y = output_error_sums(args[0], W[name], dW=dW[name], Y_hat=y_hat)
        energy[name] += y
        err[name] += e

    params = {n: modules[n].weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    if grad:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
    handles = [m.register_forward_hook(lambda m_, a, o, n=n: hook(m_, a, o, n))
               for n, m in modules.items()]
    total, count = 0.0, windows.shape[0] * (windows.shape[1] - 1)
    try:
        with torch.set_grad_enabled(grad):
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                nll = token_nll(model(input_ids=batch, use_cache=False).logits, batch).sum()
                total += float(nll.detach().double())
                if grad:
                    (nll / count).backward()
    finally:
        for h in handles:
            h.remove()
        if grad:
            for p, flag in flags.items():
                p.requires_grad_(flag)
    layers = {}
    for n in names:
        row = {"rel_err_fp": relative_output_error_from_hessian(W[n], W_hat[n], hessians[n]),
               "rel_err_prop": err[n] / energy[n] if energy[n] > 0 else 0.0,
               "distance": float(dW[n].norm() / W[n].norm().clamp_min(1e-30))}
        if grad:
            g = params[n].grad
            g = g if g.shape == W[n].shape else g.T  # GPT-2 Conv1D stores (in, out)
            row["grad_cosine"] = cosine(g, relative_output_error_grad(W[n], W_hat[n], hessians[n]))
            params[n].grad = None
        layers[n] = row
    return {"nll": total / count,
            "local_fp_mean": sum(r["rel_err_fp"] for r in layers.values()) / len(layers),
            "local_prop_mean": sum(r["rel_err_prop"] for r in layers.values()) / len(layers),
            "distance": relative_norm(dW, W), "layers": layers}


def _nll(model, windows, batch_size) -> float:
    return evaluate_nll(model, windows, batch_size=batch_size, progress=False).nll


def one_layer_sensitivity(model: nn.Module, windows: torch.Tensor,
                          solution: dict[str, torch.Tensor], base_nll: float, *,
                          batch_size: int = 2, progress: bool = True, desc: str = "sensitivity"
                          ) -> dict[str, float]:
    """{name: NLL(only this layer at its solution weight) - base_nll}, the model otherwise as is."""
    out = {}
    for n in tqdm(solution, desc=desc, disable=not progress):
        with swapped_weights(model, {n: solution[n]}):
            out[n] = _nll(model, windows, batch_size) - base_nll
    return out


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
