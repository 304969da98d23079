"""Where `finetune` reads its token blocks from: a small protocol that is deterministic and can
start mid-epoch, so that a resumed run reads exactly the batches the interrupted one would have.

The loop asks a `DataSource` for the global batches of one epoch (the `size` = batch_size x
world_size blocks of one micro-step across all processes; each process keeps its own slice of
batch_size rows, so data-parallel runs share one order). A source has three members:

  seq_len      tokens per block
  num_blocks   blocks per epoch, or None for a stream of unknown length (then the budget must be
               max_steps or max_tokens, since epochs cannot be counted into steps)
  batches(seed, epoch, size, start=0)
               an iterator of full global batches (ids (size,) int64, tokens (size, seq_len)),
               from the start-th batch of the epoch on

`batches` must be a pure function of its arguments: the same call yields the same batches, and
start=k yields what start=0 yields after its first k. ids name the blocks (e.g. their position in
the corpus) for the count of unique tokens seen. A streaming source over pre-tokenized shards would
shuffle shard order with seed + epoch and seek to batch `start` by offset instead of reading.

`TokenBlocks` is the in-memory source: epoch e is torch.randperm(n) drawn from seed + e, cut into
consecutive batches, the incomplete last batch dropped so that every optimizer step sees equally
many tokens.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch

from ptq.errors import OptionsError

__all__ = ["DataSource", "TokenBlocks"]


@runtime_checkable
class DataSource(Protocol):
    seq_len: int
    num_blocks: int | None

    def batches(self, seed: int, epoch: int, size: int,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class TokenBlocks:
    """The (n, seq_len) token blocks of a data budget, in a new seeded order every epoch."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.ndim != 2 or blocks.dtype.is_floating_point:
            raise OptionsError(f"token blocks must be an integer tensor (n, seq_len); got "
                               f"{blocks.dtype} {tuple(blocks.shape)}")
        self.blocks = blocks
        self.num_blocks, self.seq_len = blocks.shape

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The permutation (n,) of epoch `epoch`; its own generator, the global RNG untouched."""
        return torch.randperm(self.num_blocks,
                              generator=torch.Generator().manual_seed(seed + epoch))

    def batches(self, seed: int, epoch: int, size: int,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(seed, epoch)
        for b in range(start, self.num_blocks // size):
            ids = order[b * size:(b + 1) * size]
            yield ids, self.blocks[ids]
