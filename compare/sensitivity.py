"""`one_layer_sensitivity`: the NLL increase when only one layer holds its quantized weight,
run from the perturbed layer's decoder block onward on cached block inputs (the blocks before
it compute what they always do). Losses are in nats per scored token (compare.evaluate).

How the block cache and the skipping forward (`_BlockCache`, `_Skipped`) work is told in the
comment below; `_BlockCache.agrees` checks them against the plain path (the whole model for
every layer), which is taken wherever they do not apply.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.arch import ArchError, decoder_blocks, get_arch

from .evaluate import token_nll
from .solutions import _nll, swapped_weights

__all__ = ["one_layer_sensitivity"]


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
