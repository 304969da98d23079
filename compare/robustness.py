"""PTQ robustness of a model: its held-out loss after post-training quantization, relative to
its own full-precision loss (papers A and D).

A setting is written METHOD:SPEC[+aB], e.g. "gptq:int3-g64" (weight-only GPTQ), "rtn:int4-ch",
or "rtn:int8-sym-ch+a8": weights by the method, and every selected linear layer's input
fake-quantized per token to B bits (`ptq.activations`); "w8a8" is short for the last one
(per-channel int8 weights x per-token int8 activations, paper D's W8A8).

The quantization error is paper A's CE(Wq) / CE(W) - 1 (`relative_increase`), the same number
as paper D's relative change of the held-out loss (x 100 for percent); the raw gap is
CE(Wq) - CE(W) in nats per token.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ptq import quantize_model
from ptq.activations import quantized_inputs
from ptq.errors import OptionsError
from ptq.formats import parse_spec
from ptq.registry import get_method

from .evaluate import evaluate_nll

__all__ = ["Setting", "parse_setting", "quantized_nll", "relative_increase", "ALIASES"]

ALIASES = {"w8a8": "rtn:int8-sym-ch+a8"}


@dataclass(frozen=True)
class Setting:
    name: str
    method: str
    spec: str
    act_bits: int = 0  # 0: activations stay in full precision


def parse_setting(text: str) -> Setting:
    """'METHOD:SPEC[+aB]' or an alias (w8a8) -> Setting, every part checked."""
    full = ALIASES.get(text, text)
    method, sep, rest = full.partition(":")
    spec, _, act = rest.partition("+")
    if not sep or not spec:
        raise OptionsError(f"PTQ setting {text!r}: write METHOD:SPEC[+aB], e.g. gptq:int3-g64 "
                           f"or rtn:int8-sym-ch+a8, or one of {sorted(ALIASES)}")
    get_method(method)  # unknown methods name the known ones
    spec = str(parse_spec(spec))
    bits = 0
    if act:
        if not (act.startswith("a") and act[1:].isdigit() and 2 <= int(act[1:]) <= 16):
            raise OptionsError(f"PTQ setting {text!r}: the activation part is +aB with B in 2..16,"
                               " e.g. +a8")
        bits = int(act[1:])
    return Setting(text, method, spec, bits)


def quantized_nll(model: nn.Module, setting: Setting, windows: torch.Tensor,
                  calib: torch.Tensor | None, *, batch_size: int = 8,
                  progress: bool = False) -> float:
    """Quantize `model` in place as `setting` says (calibrating on `calib` when the method
    needs data) and return its held-out NLL on `windows`; the caller restores the weights."""
    needs = get_method(setting.method).needs_data
    quantize_model(model, setting.spec, setting.method, calib=calib if needs else None,
                   progress=progress)
    rounding = quantized_inputs(model, setting.act_bits) if setting.act_bits else nullcontext()
    with rounding:
        return evaluate_nll(model, windows, batch_size=batch_size, progress=progress).nll


def relative_increase(fp_nll: float, q_nll: float) -> float:
    """Paper A's quantization error CE(Wq) / CE(W) - 1."""
    return q_nll / fp_nll - 1
