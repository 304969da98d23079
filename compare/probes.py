"""Model-level measurements of the alignment study, on one set of held-out probe windows.

A *solution* is the set of weights W_hat a method gives the selected linear layers; everything is
measured against the FP weights W of the same layers (`fp_weights`, (out, in) tensors):
  - `heldout_hessians`: H_l = 2/m X_l^T X_l of each layer on the probe windows, FP model (once);
  - `probe`: for the model as it stands, the mean NLL on the probe windows; each layer's local
    loss with FP inputs (from H_l) and with the inputs the model itself feeds the layer (propagated
    through the already quantized layers, measured by a forward hook); ||dW|| / ||W||; and, with
    grad=True, the cosine between d NLL / d W_hat and the local-loss gradient, per layer;
  - `block_reference`, `block_errors`: each decoder block's local loss (ptq.metrics), the
    solution's block k run on the FP model's block-k inputs against the FP block's outputs,
    from hidden states cached once;
  - `one_layer_sensitivity`: the NLL increase when only one layer holds its quantized weight,
    run from the perturbed layer's decoder block onward on cached block inputs (the blocks
    before it compute what they always do);
  - `nll_along`, `random_direction`, `random_radius`: the loss along W + t D.
Losses are in nats per scored token (compare.evaluate protocol), local losses are the ratio of
ptq.metrics.

The Hessians, `probe` and the block references live here; the solution helpers in
`compare.solutions`, `one_layer_sensitivity` in `compare.sensitivity` and the directions in
`compare.landscape`, all re-exported here (`from compare.probes import nll_along` keeps working).
None of them imports this module, so the re-exports make no import circle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptq.arch import decoder_blocks
from ptq.capture import block_output, capture_block_inputs
from ptq.hessian import HessianAccumulator
from ptq.metrics import (block_error_sums, output_energy, output_error_sums, ratio,
                         relative_output_error_from_hessian, relative_output_error_grad)

from .alignment import cosine, relative_norm
from .evaluate import token_nll
from .landscape import nll_along, random_direction, random_radius
from .sensitivity import one_layer_sensitivity
from .solutions import _nll, _weight, solution_weights, swapped_weights  # noqa: F401

__all__ = ["solution_weights", "swapped_weights", "heldout_hessians", "probe", "BlockReference",
           "block_reference", "block_errors",
           "one_layer_sensitivity", "nll_along", "random_direction", "random_radius"]


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
          hessians: dict[str, torch.Tensor], *, grad: bool = False, batch_size: int = 2,
          blocks: BlockReference | None = None, energies: dict[str, float] | None = None
          ) -> dict:
    """Global and local losses of the model as it stands (module docstring). `energies`:
    {name: ptq.output_energy(fp_weights[name], hessians[name])}, the same for every model
    probed against these weights and Hessians; computed here when not given.

    Returns {"nll", "local_fp_mean", "local_prop_mean", "distance", "layers": {name: {...}}};
    the means are over layers; distance is relative_norm over all layers. With `blocks` (the
    FP model's `block_reference` on the same windows), also "block_fp_mean" and "blocks", the
    per-block local losses (`block_errors`).
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
    if energies is None:
        energies = {n: output_energy(W[n], hessians[n]) for n in names}
    for n in names:
        row = {"rel_err_fp": relative_output_error_from_hessian(W[n], W_hat[n], hessians[n],
                                                                energy=energies[n]),
               "rel_err_prop": err[n] / energy[n] if energy[n] > 0 else 0.0,
               "distance": float(dW[n].norm() / W[n].norm().clamp_min(1e-30))}
        if grad:
            g = params[n].grad
            g = g if g.shape == W[n].shape else g.T  # GPT-2 Conv1D stores (in, out)
            row["grad_cosine"] = cosine(g, relative_output_error_grad(W[n], W_hat[n], hessians[n],
                                                                      energy=energies[n]))
            params[n].grad = None
        layers[n] = row
    out = {"nll": total / count,
           "local_fp_mean": sum(r["rel_err_fp"] for r in layers.values()) / len(layers),
           "local_prop_mean": sum(r["rel_err_prop"] for r in layers.values()) / len(layers),
           "distance": relative_norm(dW, W), "layers": layers}
    if blocks is not None:
        out["blocks"] = block_errors(model, blocks)
        out["block_fp_mean"] = sum(out["blocks"]) / len(out["blocks"])
    return out


@dataclass
class BlockReference:
    """The FP model's hidden states around every decoder block on the probe windows:
    hidden[k][i] enters block k on batch i (hidden[k + 1][i] is what the FP block k returns),
    with the keyword arguments kwargs[k][i] the model's own forward gives it."""

    hidden: list[list[torch.Tensor]]
    kwargs: list[list[dict]]


@torch.no_grad()
def block_reference(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 2
                    ) -> BlockReference:
    """Run the FP `model` block by block on `windows` and keep every block's input and output
    (n_blocks + 1 hidden states per token, in the model's dtype)."""
    device = next(model.parameters()).device
    captured = capture_block_inputs(model, windows, batch_size, device)
    hidden = [list(captured.hidden)]
    for k, block in enumerate(decoder_blocks(model)):
        hidden.append([block_output(block(x, **kw))
                       for x, kw in zip(hidden[k], captured.kwargs(k))])
    return BlockReference(hidden, captured.block_kwargs)


@torch.no_grad()
def block_errors(model: nn.Module, ref: BlockReference) -> list[float]:
    """Each block's relative output error (ptq.metrics.block_error_sums) of the model as it
    stands, on the FP inputs of `ref`: the block-level local loss with FP inputs."""
    out = []
    for k, block in enumerate(decoder_blocks(model)):
        num = den = 0.0
        for x, y, kw in zip(ref.hidden[k], ref.hidden[k + 1], ref.kwargs[k]):
            e, d = block_error_sums(x, y, block_output(block(x, **kw)))
            num, den = num + e, den + d
        out.append(ratio(num, den))
    return out

