"""Fine-tuning on a PTQ data budget, one call per mode: QAFT (STE), QLoRA-style LoRA, FP control.

    res = qaft.finetune_qaft(model, blocks, "int3-g64", QAFTConfig(init="gptq"),
                             TrainConfig(lr=1e-4, schedule="cosine"))
    res = qaft.finetune_lora(model, blocks, "int3-g64", LoraOptions(rank=16), TrainConfig())
    res = qaft.finetune_fp(model, blocks, TrainConfig())          # the control

Each trains `model` in place on exactly the blocks PTQ calibrates on and returns a
`FinetuneResult`: the model (with grid weights for QAFT and LoRA), the codes for
`ptq.save_quantized`, the training record and an `info` dict of what was done. A GPTQ start
(init "gptq") runs `ptq.quantize_model(..., "gptq", calib=blocks)` on the same budget first.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ptq.apply import quantize_model
from ptq.errors import OptionsError
from ptq.formats import QuantizedTensor, QuantSpec, parse_spec
from ptq.gptq import GPTQOptions
from ptq.layers import FilterFn, linear_weight, select_linears

from .fake_quant import QAFTConfig, convert, prepare
from .lora import MERGED_NOTE, LoraOptions, merge_and_requantize, prepare_lora
from .train import TrainConfig, TrainResult, finetune

__all__ = ["FinetuneResult", "finetune_qaft", "finetune_lora", "finetune_fp"]


@dataclass
class FinetuneResult:
    model: nn.Module
    codes: dict[str, QuantizedTensor] | None  # None for the FP control
    train: TrainResult
    info: dict  # mode, configs, seconds (gptq_seconds for a GPTQ start), notes


def _gptq_start(model, blocks, spec, gptq: GPTQOptions | None, filter_fn, progress, info):
    if not isinstance(blocks, torch.Tensor):
        raise OptionsError("a GPTQ start calibrates on the token blocks: pass them as one "
                        "(n, seq_len) tensor")
    t0 = time.perf_counter()
    res = quantize_model(model, spec, "gptq", gptq or GPTQOptions(), calib=blocks,
                         filter_fn=filter_fn, progress=progress)
    info.update(gptq=res.options, gptq_seconds=time.perf_counter() - t0)
    return res.quantized


def finetune_qaft(model: nn.Module, blocks, spec: QuantSpec | str,
                  config: QAFTConfig = QAFTConfig(), train: TrainConfig = TrainConfig(), *,
                  gptq: GPTQOptions | None = None, filter_fn: FilterFn | None = None,
                  local_inputs: dict[str, torch.Tensor] | None = None, eval_fn=None,
                  progress: bool = True, **train_kwargs) -> FinetuneResult:
    """QAFT: fake-quantize the selected layers (qaft.prepare), train with the STE, snap onto the
    grid (qaft.convert). local_inputs {layer: X (m, in)}: record each layer's local loss against
    its FP weight during training. train_kwargs go to `qaft.train.finetune` (checkpoints)."""
    spec = parse_spec(spec)
    if gptq is not None and config.init != "gptq":
        raise OptionsError(f"GPTQ options were given but init is {config.init!r}; they apply to "
                         "init gptq only")
    t0 = time.perf_counter()
    info = {"mode": "qaft", "qaft": {**asdict(config), "scale_mode": config.scales},
            "train": asdict(train)}
    reference = None
    if local_inputs:  # the FP weights, before a GPTQ start or prepare changes them
        reference = {n: linear_weight(m).detach().clone()
                     for n, m in select_linears(model, filter_fn) if n in local_inputs}
    solution = (_gptq_start(model, blocks, spec, gptq, filter_fn, progress, info)
                if config.init == "gptq" else None)
    prepare(model, spec, config, filter_fn=filter_fn, solution=solution)
    result = finetune(model, blocks, train, local_inputs=local_inputs, local_reference=reference,
                      eval_fn=eval_fn, progress=progress, **train_kwargs)
    codes = convert(model)
    info["seconds"] = time.perf_counter() - t0
    return FinetuneResult(model, codes, result, info)


def finetune_lora(model: nn.Module, blocks, spec: QuantSpec | str,
                  lora: LoraOptions = LoraOptions(), train: TrainConfig = TrainConfig(), *,
                  gptq: GPTQOptions | None = None, filter_fn: FilterFn | None = None,
                  eval_fn=None, progress: bool = True, **train_kwargs) -> FinetuneResult:
    """LoRA adapters on a frozen base snapped onto the grid (RTN or GPTQ), trained, merged and
    re-quantized with RTN: the returned model is that re-quantized one (info["note"])."""
    spec = parse_spec(spec)
    if gptq is not None and lora.init != "gptq":
        raise OptionsError(f"GPTQ options were given but the LoRA init is {lora.init!r}")
    t0 = time.perf_counter()
    info = {"mode": "lora", "lora": asdict(lora), "train": asdict(train), "note": MERGED_NOTE}
    solution = (_gptq_start(model, blocks, spec, gptq, filter_fn, progress, info)
                if lora.init == "gptq" else None)
    peft_model = prepare_lora(model, spec, lora, filter_fn=filter_fn, init=solution)
    result = finetune(peft_model, blocks, train, eval_fn=eval_fn, progress=progress,
                      **train_kwargs)
    model, codes = merge_and_requantize(peft_model, spec, filter_fn=filter_fn)
    info["seconds"] = time.perf_counter() - t0
    return FinetuneResult(model, codes, result, info)


def finetune_fp(model: nn.Module, blocks, train: TrainConfig = TrainConfig(), *, eval_fn=None,
                progress: bool = True, **train_kwargs) -> FinetuneResult:
    """The FP control: the same loop, schedule and blocks, no quantization."""
    t0 = time.perf_counter()
    result = finetune(model, blocks, train, eval_fn=eval_fn, progress=progress, **train_kwargs)
    return FinetuneResult(model, None, result, {"mode": "fp", "train": asdict(train),
                                                "seconds": time.perf_counter() - t0})
