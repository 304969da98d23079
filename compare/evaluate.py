"""Global loss: mean token negative log-likelihood and perplexity on held-out text.

Protocol (the same for every method and model):
  - the held-out split is tokenized once, without special tokens, as one stream;
  - the stream is cut into non-overlapping windows of `seq_len` tokens, the remainder dropped,
    and the first `max_tokens // seq_len` windows are kept;
  - each window is scored on its own (no context carried over): tokens 2..seq_len are predicted
    from the tokens before them in the window, so n_windows * (seq_len - 1) tokens are scored;
  - NLL is the mean over all scored tokens in nats (log-softmax in float32), perplexity exp(NLL).
This is the usual GPTQ/WikiText protocol, and equals transformers' own `labels=` loss averaged
over windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import DataError

__all__ = ["EvalResult", "eval_windows", "token_nll", "evaluate_nll"]


@dataclass
class EvalResult:
    nll: float  # mean token NLL, nats
    perplexity: float
    scored_tokens: int  # n_windows * (seq_len - 1)
    n_windows: int
    seq_len: int
    seconds: float
    tokens_per_second: float  # input tokens (n_windows * seq_len) per second of forward passes

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """(n_windows, seq_len) non-overlapping windows from the start of a 1-D token stream."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} must be at least 2")
    n = tokens.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise DataError(
            f"held-out text has {tokens.numel():,} tokens, max_tokens={max_tokens}: not one "
            f"window of seq_len={seq_len}; lower --seq-len or give more text / --max-tokens")
    return tokens[: n * seq_len].view(n, seq_len)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (batch, seq_len - 1) of next-token prediction, computed in float32."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def evaluate_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 2,
                 progress: bool = True, desc: str = "eval") -> EvalResult:
    """Mean token NLL and perplexity of `model` over `windows` (see module docstring)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    t0 = time.perf_counter()
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = token_nll(logits, batch)
        total += float(nll.double().sum())
        count += nll.numel()
    seconds = time.perf_counter() - t0
    mean = total / count
    return EvalResult(mean, math.exp(mean), count, windows.shape[0], windows.shape[1], seconds,
                      windows.numel() / max(seconds, 1e-9))
