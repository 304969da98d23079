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
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.arch import ArchError, decoder_blocks, get_arch
from ptq.capture import block_output, capture_block_inputs
from ptq.layers import linear_weight, set_linear_weight
from ptq.hessian import HessianAccumulator
from ptq.metrics import (block_error_sums, output_energy, output_error_sums, ratio,
                         relative_output_error_from_hessian, relative_output_error_grad)
from qaft.fake_quant import FakeQuantLinear

from .alignment import cosine, relative_norm
from .evaluate import evaluate_nll, token_nll

__all__ = ["solution_weights", "swapped_weights", "heldout_hessians", "probe", "BlockReference",
           "block_reference", "block_errors",
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


def _nll(model, windows, batch_size) -> float:
    return evaluate_nll(model, windows, batch_size=batch_size, progress=False).nll


# --- one-layer sensitivity from cached block inputs ----------------------------------------
#
# A layer in decoder block k changes nothing before block k, so the hidden states entering
# block k are those of the model as it stands, cached once per call. Each perturbed forward
# then swaps blocks 0..k-1 for pass-through stand-ins (`_Skipped`) and a forward pre-hook on
# block k replaces the hidden state it receives with the cached one. Unlike a truncated block
# list, this keeps each block at its position, so a loop that picks a block's arguments by its
# index (`config.layer_types[i]` in Gemma 2/3 and Qwen2) still gives block k its own mask; the
# embeddings, masks and positions are computed by the model as usual (cheap). What a model
# does that this cannot reproduce (state carried between blocks besides the hidden state) is
# caught by `_BlockCache.agrees`, which compares the skipping forward's logits with the full.


def _hidden_name(block: nn.Module) -> str:
    """Name of the block's hidden-state parameter: the first of its forward."""
    return next(iter(inspect.signature(block.forward).parameters))


def _hidden_arg(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


class _Skipped(nn.Module):
    """Stands in for a decoder block before the perturbed one: returns its hidden-state input
    unchanged, as the block would return its output (a tensor, or a `tuple_len`-tuple led by
    it). The real block is a plain attribute, not a submodule; attributes the model's loop reads
    from the block (e.g. `attention_type`) come from it."""

    def __init__(self, block: nn.Module, hidden_name: str, tuple_len: int):
        super().__init__()
        self.__dict__["block"] = block
        self.hidden_name, self.tuple_len = hidden_name, tuple_len

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["block"], name)

    def forward(self, *args, **kwargs):
        hidden = _hidden_arg(args, kwargs, self.hidden_name)
        return (hidden,) + (None,) * (self.tuple_len - 1) if self.tuple_len else hidden


@dataclass
class _BlockCache:
    """The hidden states entering every decoder block, per batch of the probe windows, on the
    model's device."""

    path: str  # dotted path of the blocks' ModuleList
    blocks: nn.ModuleList
    hidden_names: list[str]  # each block's hidden-state parameter
    batches: list[torch.Tensor]  # (batch, seq) token ids
    hidden: list[list[torch.Tensor]]  # [batch i][block k] (batch, seq, dim)
    tuple_len: int  # 0: the blocks return a tensor; n: an n-tuple led by the hidden state

    def block_of(self, name: str) -> int | None:
        """Index of the decoder block holding layer `name`, None outside the blocks."""
        head, _, rest = name.partition(self.path + ".")
        index = rest.split(".", 1)[0]
        return int(index) if head == "" and index.isdigit() else None

    def logits(self, model: nn.Module, k: int, i: int) -> torch.Tensor:
        """Logits of batch i with blocks 0..k-1 skipped and block k fed its cached input (a
        forward pre-hook replaces the hidden state the loop passes it); the block list and the
        hook are undone on the way out."""
        def feed(module, args, kwargs):
            if args:
                return (self.hidden[i][k],) + tuple(args[1:]), kwargs
            return args, {**kwargs, self.hidden_names[k]: self.hidden[i][k]}

        parent_path, _, attr = self.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        skipped = [_Skipped(b, self.hidden_names[j], self.tuple_len)
                   for j, b in enumerate(self.blocks[:k])]
        handle = self.blocks[k].register_forward_pre_hook(feed, with_kwargs=True)
        setattr(parent, attr, nn.ModuleList(skipped + list(self.blocks[k:])))
        try:
            return model(input_ids=self.batches[i], use_cache=False).logits
        finally:
            setattr(parent, attr, self.blocks)
            handle.remove()

    @torch.no_grad()
    def nll(self, model: nn.Module, k: int) -> float:
        """Mean token NLL over all batches, run from block k (summed as evaluate_nll sums)."""
        total, count = 0.0, 0
        for i, batch in enumerate(self.batches):
            nll = token_nll(self.logits(model, k, i), batch)
            total += float(nll.double().sum())
            count += nll.numel()
        return total / count

    @torch.no_grad()
    def agrees(self, model: nn.Module, k: int, logits0: torch.Tensor) -> bool:
        """Whether running from block k gives `logits0`, the full forward's on batch 0."""
        return torch.allclose(self.logits(model, k, 0), logits0, rtol=1e-5,
                              atol=1e-5 * float(logits0.abs().max()))


@torch.no_grad()
def _cache_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int,
                        max_bytes: int) -> tuple[_BlockCache, torch.Tensor] | str:
    """The `_BlockCache` of the model as it stands on `windows` and the full forward's logits
    (batch, seq, vocab) of its first batch; or why not, a sentence."""
    try:
        path, blocks = get_arch(model).blocks, decoder_blocks(model)
    except ArchError as e:
        return f"its decoder blocks are not found ({e})"
    device = next(model.parameters()).device
    names = [_hidden_name(b) for b in blocks]
    row: list[torch.Tensor] = []
    out_kind: list[int] = []

    def record(module, args, kwargs, k):
        # a copy, so that a block working in place on its input cannot change the cache
        row.append(_hidden_arg(args, kwargs, names[k]).detach().clone())

    handles = [b.register_forward_pre_hook(lambda m, a, kw, k=k: record(m, a, kw, k),
                                           with_kwargs=True) for k, b in enumerate(blocks)]
    handles.append(blocks[0].register_forward_hook(
        lambda m, a, o: out_kind.append(len(o) if isinstance(o, tuple) else 0)))
    batches = [b.to(device) for b in windows.split(batch_size)]
    hidden, logits0 = [], None
    try:
        for batch in batches:
            row = []
            logits = model(input_ids=batch, use_cache=False).logits
            if len(row) != len(blocks):
                return (f"its forward called its {len(blocks)} decoder blocks {len(row)} times; "
                        "one call each was expected")
            hidden.append(row)
            if logits0 is None:
                logits0 = logits
                per_row = sum(t.numel() * t.element_size() for t in row) / batch.shape[0]
                need = per_row * windows.shape[0]
                if need > max_bytes:
                    return (f"caching the inputs of its {len(blocks)} blocks needs "
                            f"{need / 2**20:,.0f} MiB, over max_cache_bytes={max_bytes:,}; "
                            "raise it or give fewer windows")
    finally:
        for h in handles:
            h.remove()
    return _BlockCache(path, blocks, names, batches, hidden, out_kind[0]), logits0


def _fast_cache(model, windows, solution, batch_size, max_cache_bytes) -> _BlockCache | None:
    """The block cache, checked for every block that `solution` touches past block 0; None,
    with a warning, where the fast path does not apply to this model."""
    why = _cache_block_inputs(model, windows, batch_size, max_cache_bytes)
    if not isinstance(why, str):
        cache, logits0 = why
        ks = {cache.block_of(n) for n in solution} - {None, 0}
        bad = next((k for k in sorted(ks) if not cache.agrees(model, k, logits0)), None)
        if bad is None:
            return cache
        why = (f"running it from block {bad} on cached inputs does not reproduce its full "
               "forward's logits (its loop passes blocks more than the hidden state)")
    warnings.warn(f"one_layer_sensitivity: {type(model).__name__}: {why}; running the whole "
                  "model for every layer instead (same results, slower)", stacklevel=3)
    return None


def one_layer_sensitivity(model: nn.Module, windows: torch.Tensor,
                          solution: dict[str, torch.Tensor], base_nll: float, *,
                          batch_size: int = 2, progress: bool = True, desc: str = "sensitivity",
                          fast: bool = True, max_cache_bytes: int = 1 << 30
                          ) -> dict[str, float]:
    """{name: NLL(only this layer at its solution weight) - base_nll}, the model otherwise as is.

    fast=True runs each perturbed forward from the layer's decoder block onward: the hidden
    states entering every block on `windows` are cached once per call, on the model's device:
    n_blocks x n_tokens x hidden x 4 bytes in float32 (SmolLM2-135M, 30 blocks x 1,024 tokens
    x 576: 70 MB), and the first batch's logits while the path is checked. A layer in block k
    then costs blocks k.. instead of all, with results equal to the whole-model forward's up to
    float rounding. The plain path (the whole model for every layer, fast=False) is taken, with
    a warning, where the cache would exceed `max_cache_bytes`, the blocks are not found, or the
    check at the start fails (for each touched block k > 0, running from k must give the full
    forward's logits on the first batch); layers outside the blocks always take it.
    """
    cache = _fast_cache(model, windows, solution, batch_size, max_cache_bytes) if fast else None
    out = {}
    for n in tqdm(solution, desc=desc, disable=not progress):
        k = cache.block_of(n) if cache is not None else None
        with swapped_weights(model, {n: solution[n]}):
            nll = _nll(model, windows, batch_size) if k is None else cache.nll(model, k)
        out[n] = nll - base_nll
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
