"""Global loss: mean token negative log-likelihood and perplexity on held-out text.

Protocol (the same for every method and model):
  - the held-out split is tokenized once, without special tokens, as one stream;
  - BOS follows the tokenizer's convention (`compare.data.bos_token_id`): when the tokenizer
    prepends its BOS token, every window is [BOS] + seq_len - 1 consecutive stream tokens,
    otherwise seq_len stream tokens; the windows' stream tokens do not overlap, the remainder is
    dropped, and the first `max_tokens // seq_len` windows are kept (max_tokens caps the model's
    input tokens, BOS included, so the number of windows does not depend on BOS);
  - each window is scored on its own (no context carried over): tokens 2..seq_len are predicted
    from the tokens before them in the window, so n_windows * (seq_len - 1) tokens are scored;
    a BOS is input only, never a target, so with BOS every stream token of a window is scored;
  - NLL is the mean over all scored tokens in nats (log-softmax in float32), perplexity exp(NLL);
    each window's own mean NLL is kept too (`window_nll`), the unit a paired comparison of two
    solutions on the same windows resamples (compare.stats). Every window scores the same number
    of tokens, so NLL is also the plain mean of the window means (up to float rounding).
This is the usual GPTQ/WikiText protocol, and equals transformers' own `labels=` loss averaged
over windows. With `reference` (the FP model's log-probabilities from `reference_logprobs`, same
windows), the same pass also gives KL(FP || model) of the next-token distributions, in nats,
averaged over the same scored tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import DataError, TextSplits, bos_token_id, tokenize, with_bos

__all__ = ["EvalResult", "eval_windows", "heldout_windows", "next_token_logprobs", "token_nll",
           "evaluate_nll", "reference_logprobs", "kl_divergence"]


@dataclass
class EvalResult:
    nll: float  # mean token NLL, nats
    perplexity: float
    scored_tokens: int  # n_windows * (seq_len - 1)
    n_windows: int
    seq_len: int
    seconds: float
    tokens_per_second: float  # input tokens (n_windows * seq_len) per second of forward passes
    kl: float | None = None  # mean KL(reference || model) per scored token, nats
    bos: bool = False  # every window started with a BOS token (input only, never scored)
    # (n_windows,) mean NLL of each window over its seq_len - 1 scored tokens, nats, window order
    window_nll: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None, *,
                 bos_id: int | None = None) -> torch.Tensor:
    """(n_windows, seq_len) windows from the start of a 1-D token stream: non-overlapping runs of
    seq_len tokens, or with bos_id, bos_id followed by non-overlapping runs of seq_len - 1 tokens.

    max_tokens caps the model input tokens n_windows * seq_len (BOS included): at most
    max_tokens // seq_len windows, with or without BOS.
    """
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} must be at least 2")
    width = seq_len - (bos_id is not None)  # stream tokens per window
    n = tokens.numel() // width
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        what = f"seq_len={seq_len}" if bos_id is None else f"BOS + {width} tokens"
        raise DataError(
            f"held-out text has {tokens.numel():,} tokens, max_tokens={max_tokens}: not one "
            f"window of {what}; lower --seq-len or give more text / --max-tokens")
    windows = tokens[: n * width].view(n, width)
    return windows if bos_id is None else with_bos(windows, bos_id)


def heldout_windows(tokenizer, text: TextSplits, seq_len: int, max_tokens: int | None = None,
                    add_bos: bool | None = None) -> tuple[torch.Tensor, int | None]:
    """(windows, bos_id): the evaluation windows of the held-out split of `text` (module
    docstring), with BOS by the tokenizer's convention unless add_bos says otherwise; pass
    bos_id on to `evaluate_nll(..., bos_id=)` so the result records it."""
    bos_id = bos_token_id(tokenizer, add_bos)
    return eval_windows(tokenize(tokenizer, text.heldout), seq_len, max_tokens,
                        bos_id=bos_id), bos_id


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """(batch, seq_len - 1, vocab) float32 log-probabilities of each next token."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def _picked_nll(logp: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (batch, seq_len - 1) of next-token prediction, computed in float32."""
    return _picked_nll(next_token_logprobs(logits), input_ids)


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per position, from log-probabilities (..., vocab); float32 in, float64 out."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1, dtype=torch.float64)


@torch.no_grad()
def reference_logprobs(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 2,
                       progress: bool = True) -> torch.Tensor:
    """(n_windows, seq_len - 1, vocab) float32 next-token log-probabilities of `model`, on the CPU:
    the reference of `evaluate_nll(..., reference=)`. 4 bytes x tokens x vocab of memory
    (0.8 GB for 4,096 tokens of SmolLM2's 49,152-token vocabulary)."""
    device = next(model.parameters()).device
    out = []
    for batch in tqdm(windows.split(batch_size), desc="FP reference", disable=not progress,
                      leave=False):
        logits = model(input_ids=batch.to(device), use_cache=False).logits
        out.append(next_token_logprobs(logits).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_nll(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 2,
                 progress: bool = True, desc: str = "eval",
                 reference: torch.Tensor | None = None,
                 bos_id: int | None = None) -> EvalResult:
    """Mean token NLL and perplexity of `model` over `windows` (see module docstring), and the KL
    from `reference` log-probabilities of the same windows when given. bos_id: the BOS the
    windows were built with (`eval_windows(..., bos_id=)`), checked and recorded as `bos`."""
    if reference is not None and reference.shape[:2] != (windows.shape[0], windows.shape[1] - 1):
        raise ValueError(f"reference log-probs {tuple(reference.shape)} do not match windows "
                         f"{tuple(windows.shape)}; compute them with reference_logprobs(windows)")
    if bos_id is not None and not bool((windows[:, 0] == bos_id).all()):
        raise ValueError(f"bos_id={bos_id} but not every window starts with it; build the "
                         "windows with eval_windows(..., bos_id=bos_id)")
    device = next(model.parameters()).device
    total, count, kl = 0.0, 0, 0.0
    window_nll: list[float] = []
    t0 = time.perf_counter()
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress,
                  leave=False):
        batch = windows[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # one window's float32 log-probs at a time: they (and the KL's terms) are the largest
        # temporaries; log-softmax is row by row, so the values equal the whole batch's
        rows, kl_rows = [], []
        for j in range(batch.shape[0]):
            logp = next_token_logprobs(logits[j:j + 1])
            rows.append(_picked_nll(logp, batch[j:j + 1]))
            if reference is not None:
                kl_rows.append(kl_divergence(reference[i + j:i + j + 1].to(device), logp))
            del logp
        del logits
        nll = torch.cat(rows)
        total += float(nll.double().sum())  # the overall NLL: total / count over all tokens
        count += nll.numel()
        window_nll += nll.double().mean(dim=1).tolist()  # (batch,) nats per scored token
        if reference is not None:
            kl += float(torch.cat(kl_rows).sum())
    seconds = time.perf_counter() - t0
    mean = total / count
    return EvalResult(mean, math.exp(mean), count, windows.shape[0], windows.shape[1], seconds,
                      windows.numel() / max(seconds, 1e-9),
                      kl / count if reference is not None else None, bos_id is not None,
                      tuple(window_nll))
