"""Wiring of fine-tuning on a PTQ budget: QAFT (STE), QLoRA-style LoRA, and the FP control.

    qalign finetune --spec int3-g64 --samples 128 --seq-len 512 --epochs 1 --out runs/qaft-int3
    qalign finetune --fp-control --samples 128 --seq-len 512 --out runs/fp-ft
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import nn

import qaft
from ptq.formats import parse_spec
from ptq.gptq import GPTQOptions
from ptq.sequential import quantize_sequential
from qaft.lora import MERGED_NOTE, LoraOptions, merge_and_requantize, prepare_lora
from qaft.train import TrainConfig, finetune
from recipes.quantization import add_field_flag, dataclass_from_args

__all__ = ["add_finetune_args", "finetune_model", "MODES"]

MODES = ("qaft", "lora", "fp")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="qaft",
                   help="qaft: fake-quant STE fine-tuning; lora: LoRA on a frozen quantized "
                        "base, merged and re-quantized; fp: the FP control (default: qaft)")
    p.add_argument("--init", choices=["rtn", "mse", "gptq"], default="rtn",
                   help="where quantization starts: RTN min/max, MSE-clipped RTN, or the GPTQ "
                        "solution on the same budget (default: rtn)")
    p.add_argument("--scale-mode", choices=list(qaft.SCALE_MODES), default=None,
                   help="qaft scales: dynamic (min/max each step), fixed, learned (LSQ); "
                        "default dynamic, or fixed with --init gptq")
    p.add_argument("--clipped-ste", action=argparse.BooleanOptionalAction, default=True,
                   help="no gradient outside each block's range (default: on)")
    for f in dataclasses.fields(TrainConfig):
        add_field_flag(p, f, "training")
    for f in dataclasses.fields(LoraOptions):
        if f.name != "dropout":
            add_field_flag(p, f, "lora")


def finetune_model(model: nn.Module, calib: torch.Tensor, spec: str | None, args, *,
                   local_inputs=None, eval_fn=None, progress: bool = True):
    """Fine-tune `model` in place on `calib` as args say; returns (model, codes or None,
    TrainResult, info). With mode qaft/lora the returned model holds grid weights."""
    cfg = dataclass_from_args(TrainConfig, args)
    info = {"mode": args.mode, "train": dataclasses.asdict(cfg)}
    t0 = time.perf_counter()
    if args.mode == "fp":
        result = finetune(model, calib, cfg, eval_fn=eval_fn, progress=progress)
        info["seconds"] = time.perf_counter() - t0
        return model, None, result, info
    spec = parse_spec(spec)
    init = args.init
    if args.init == "gptq":  # start where GPTQ ends, on the same budget
        init = quantize_sequential(model, calib, spec, "gptq", GPTQOptions(),
                                   progress=progress).quantized
        info["gptq_seconds"] = time.perf_counter() - t0
    if args.mode == "lora":
        lora = dataclass_from_args(LoraOptions, args)
        peft_model = prepare_lora(model, spec, lora, init=init if isinstance(init, dict)
                                  else None)
        result = finetune(peft_model, calib, cfg, eval_fn=eval_fn, progress=progress)
        model, codes = merge_and_requantize(peft_model, spec)
        info.update(lora=dataclasses.asdict(lora), note=MERGED_NOTE)
    else:
        scale_mode = args.scale_mode or ("fixed" if isinstance(init, dict) else "dynamic")
        qaft.prepare(model, spec, init=init, scale_mode=scale_mode, clipped_ste=args.clipped_ste)
        result = finetune(model, calib, cfg, local_inputs=local_inputs, eval_fn=eval_fn,
                          progress=progress)
        codes = qaft.convert(model)
        info.update(scale_mode=scale_mode, clipped_ste=args.clipped_ste, init=args.init)
    info["seconds"] = time.perf_counter() - t0
    return model, codes, result, info
