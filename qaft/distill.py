"""Distillation from the FP model on the budget's own tokens (LLM-QAT, Liu et al. 2023, arXiv
2305.17888; BitDistiller, arXiv 2402.10631; EfficientQAT, arXiv 2407.11062).

The fake-quantized student Q learns the frozen FP teacher's next-token distributions instead of
the one-hot next token. On token blocks x (B, L), with logits z (B, L, V) and positions
t = 0..L-2 predicting tokens 1..L-1 (the positions the NLL scores):

    kd  = 1 / (B (L-1)) * sum_{b,t} KL(p_FP(. | x_<=t) || p_Q(. | x_<=t))
        = 1 / (B (L-1)) * sum_{b,t,v} p_FP,v (log p_FP,v - log p_Q,v)
    nll = 1 / (B (L-1)) * sum_{b,t} -log p_Q(x_{t+1} | x_<=t)

Both in float32 log-softmax, temperature 1. The forward KL's gradient in the student's logits is
(p_Q - p_FP) / (B (L-1)): zero where the student already matches the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptq.errors import OptionsError

__all__ = ["LOSSES", "next_token_logprobs", "kd_loss", "causal_nll"]

LOSSES = ("nll", "kd")


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """(B, L-1, V) float32 log-probabilities at the scored positions 0..L-2 of logits (B, L, V)."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the scored positions of KL(p_teacher || p_student); logits (B, L, V)."""
    if student_logits.shape != teacher_logits.shape:
        raise OptionsError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; distill between models with the "
                         "same vocabulary, on the same tokens")
    log_q = next_token_logprobs(student_logits)
    log_p = next_token_logprobs(teacher_logits)
    vocab = log_q.shape[-1]
    # batchmean: the sum over (positions, vocab) divided by the number of positions
    return F.kl_div(log_q.reshape(-1, vocab), log_p.reshape(-1, vocab), reduction="batchmean",
                    log_target=True)


def causal_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of logits (B, L, V) on input_ids (B, L), in float32."""
    logp = next_token_logprobs(logits)
    return F.nll_loss(logp.reshape(-1, logp.shape[-1]), input_ids[:, 1:].reshape(-1))
