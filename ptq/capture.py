"""The inputs of every decoder block, as the model's own forward passes them, for calibration.

Models whose layers are not all alike pass each layer its own arguments: Gemma 2/3, Qwen2/3 with
`layer_types`, Cohere2, OLMo 3 alternate sliding-window and full attention, with a different
attention mask and (Gemma 3) a different rotary embedding per layer type. Replaying block 0's
keyword arguments for every block would calibrate the full-attention blocks with the
sliding-window mask, silently; so the arguments of each block k are recorded.

The hidden states are kept in the model's own dtype (a bfloat16 model's take half the memory of
a float32 one's), on the compute device by default; with `offload_dir` they go to disk instead,
one safetensors file per batch (`DiskActivations`), read back one batch at a time, so that memory
holds one batch rather than the whole calibration budget.

One pass of the model's base (embeddings and its loop over the blocks) per calibration batch,
with every decoder block swapped for a `_Recorder` that records the (args, kwargs) the loop gives
it and returns its hidden-state input unchanged: the pass costs the embeddings (plus one real
forward of block 0 on the first batch, to learn whether the loop expects a tensor or a tuple
back). The swap is undone on the way out. Keyword arguments are kept by reference: a mask or
rotary embedding that the loop passes to several blocks is stored once.
"""

from __future__ import annotations

import inspect
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import ArchError, decoder_blocks, get_arch

__all__ = ["BlockInputs", "DiskActivations", "block_output", "capture_block_inputs"]


def block_output(y):
    """The hidden state a decoder block returns (some return it alone, some in a tuple)."""
    return y[0] if isinstance(y, tuple) else y

# arguments not replayed: the hidden states (given positionally), and the KV cache, which
# block-by-block calibration does not use
_DROPPED = frozenset({"hidden_states", "past_key_values", "past_key_value", "layer_past", "cache",
                      "use_cache"})


class DiskActivations:
    """A list of per-batch activations kept on disk: `store[i]` reads batch i (onto `device`),
    `store[i] = t` writes it (i up to len(store): writing at len(store) appends), one
    safetensors file per batch in `folder`. A batch is replaced by writing a new file and renaming
    it over the old one, so a tensor read from the old file is never changed under its reader.
    The caller owns `folder` and removes it (the driver uses a temporary directory)."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _path(self, i: int) -> Path:
        return self.folder / f"batch{i:06d}.safetensors"

    def __getitem__(self, i: int) -> torch.Tensor:
        from safetensors.torch import load_file

        if not 0 <= i < self._n:
            raise IndexError(f"batch {i} of {self._n}")
        return load_file(self._path(i), device=str(self.device))["x"]

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if not 0 <= i <= self._n:
            raise IndexError(f"batch {i}: write batches in order (have {self._n})")
        tmp = self._path(i).with_suffix(".tmp")
        save_file({"x": t.detach().contiguous()}, str(tmp))
        os.replace(tmp, self._path(i))
        self._n = max(self._n, i + 1)

    def append(self, t: torch.Tensor) -> None:
        self[self._n] = t

    def remove(self) -> None:
        """Delete the files (the store is empty afterwards)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self._n = 0

    def __iter__(self):
        return (self[i] for i in range(self._n))


@dataclass
class BlockInputs:
    """What enters the decoder blocks, per calibration batch.

    hidden[i]: (batch, seq, dim) hidden states entering block 0 on batch i, in the model's dtype
    (a list in memory, or a `DiskActivations` with offload_dir).
    kwargs(k)[i]: the keyword arguments block k receives on batch i in the model's own forward;
    run it as `block(hidden, **kwargs(k)[i])`.
    """

    hidden: list[torch.Tensor] | DiskActivations
    block_kwargs: list[list[dict]]  # [block k][batch i]

    def kwargs(self, k: int) -> list[dict]:
        return self.block_kwargs[k]

    @property
    def n_blocks(self) -> int:
        return len(self.block_kwargs)


def _to(obj, device):
    """Tensors in obj (nested tuples, lists, dicts) on device; a tensor already there is
    returned as is, not copied."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for decoder block k during capture: records the arguments the model's loop
    passes it, by name, and returns its hidden-state input unchanged.

    The real block is a plain attribute, not a submodule, so moving the model's base to the
    compute device leaves it where it is; attributes the loop reads from the block (e.g.
    `decoder_layer.attention_type`) come from it.
    """

    def __init__(self, block: nn.Module, k: int, capture: "_Capture"):
        super().__init__()
        self.__dict__["block"] = block
        self.__dict__["capture"] = capture
        self.k = k
        self.signature = inspect.signature(block.forward)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["block"], name)

    def _named(self, args, kwargs) -> dict:
        """All arguments of the call by parameter name, keyword-only ones included."""
        bound = self.signature.bind(*args, **kwargs).arguments
        named = {}
        for name, value in bound.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise ArchError(f"{type(self.block).__name__}.forward takes *{name}, which "
                                    "cannot be replayed as keyword arguments")
            else:
                named[name] = value
        return named

    def forward(self, *args, **kwargs):
        named = self._named(args, kwargs)
        hidden = named.pop(next(iter(self.signature.parameters)))
        cap = self.capture
        if self.k == 0:
            cap.hidden.append(hidden)
        cap.block_kwargs[self.k].append({n: v for n, v in named.items() if n not in _DROPPED})
        if cap.tuple_len is None:  # first call: learn what the loop expects back
            out = self.block(*args, **kwargs)
            cap.tuple_len = len(out) if isinstance(out, tuple) else 0
        return (hidden,) + (None,) * (cap.tuple_len - 1) if cap.tuple_len else hidden


@dataclass
class _Capture:
    hidden: list
    block_kwargs: list[list[dict]]
    tuple_len: int | None = None  # 0: the blocks return a tensor; n: an n-tuple


@contextmanager
def _blocks_replaced(model: nn.Module, replacement: nn.ModuleList):
    """The parent module of the decoder blocks (the model's base), with its blocks replaced
    for the duration."""
    path = get_arch(model).blocks
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    setattr(parent, attr, replacement)
    try:
        yield parent
    finally:
        setattr(parent, attr, blocks)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int,
                         device: torch.device | str, *, offload_dir: str | Path | None = None
                         ) -> BlockInputs:
    """Hidden states entering block 0 and the keyword arguments of every block, per batch of
    `calib` (n_samples, seq_len) token ids, on `device` (module docstring). With offload_dir,
    the hidden states are written there batch by batch (`DiskActivations`, read back onto
    `device`); the caller removes the folder."""
    device = torch.device(device)
    blocks = decoder_blocks(model)
    hidden = [] if offload_dir is None else DiskActivations(offload_dir, device)
    cap = _Capture(hidden=hidden, block_kwargs=[[] for _ in blocks])
    recorders = nn.ModuleList([_Recorder(b, k, cap) for k, b in enumerate(blocks)])
    block0_home = next(blocks[0].parameters(), torch.empty(0)).device
    with _blocks_replaced(model, recorders) as base:
        home = next(base.parameters()).device
        try:
            base.to(device)
            blocks[0].to(device)  # for the one real forward that learns the output type
            for batch in calib.split(batch_size):
                base(input_ids=batch.to(device), use_cache=False)
        finally:
            base.to(home)
            blocks[0].to(block0_home)
    return BlockInputs(cap.hidden, cap.block_kwargs)
