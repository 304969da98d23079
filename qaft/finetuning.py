"""Fine-tuning on a PTQ data budget, one call per mode: QAFT (STE), QLoRA-style LoRA, FP control.

    res = qaft.finetune_qaft(model, blocks, "int3-g64", QAFTConfig(init="gptq"),
                             TrainConfig(lr=1e-4, schedule="cosine"))
    res = qaft.finetune_lora(model, blocks, "int3-g64", LoraOptions(rank=16), TrainConfig())
    res = qaft.finetune_fp(model, blocks, TrainConfig())          # the control

Each trains `model` in place on exactly the blocks PTQ calibrates on and returns a
`FinetuneResult`: the model (with grid weights for QAFT and LoRA), the codes for
`ptq.save_quantized`, the training record and an `info` dict of what was done. A GPTQ start
(init "gptq") runs `ptq.quantize_model(..., "gptq", calib=blocks)` on the same budget first.
With TrainConfig(loss="kd"), QAFT and LoRA distill from a frozen copy of the FP model made before
anything is quantized. `QAFT_SEARCH_SPACE` declares the values a tuned QAFT run searches over.
"""

from __future__ import annotations

import copy
import dataclasses
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

__all__ = ["FinetuneResult", "finetune_qaft", "finetune_lora", "finetune_fp",
           "QAFT_SEARCH_SPACE", "trial_configs"]

# QAFT's hyperparameter search space as data: {field: the values to try}, each field one of
# QAFTConfig's or TrainConfig's (their names do not overlap); every combination is a valid pair
# of configs (`trial_configs`). lr: a log grid over what works in EfficientQAT and ParetoQ
# (1e-5..2e-5 end to end, 1e-4 block-wise; /work/shared/ANCHORS.md) and 10x above; init: where
# quantization starts; scale_mode: initial scales kept or learned (LSQ; dynamic is RTN at every
# step and no tuned choice); loss: NLL or distillation from the FP model. The rest keeps the
# defaults of tuned runs there: AdamW without weight decay on the quantized weights
# (weight_decay 0), warmup and cosine available as schedule options.
QAFT_SEARCH_SPACE: dict[str, tuple] = {
    "lr": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
    "init": ("rtn", "mse", "gptq"),
    "scale_mode": ("fixed", "learned"),
    "loss": ("nll", "kd"),
}


def trial_configs(trial: dict, config: QAFTConfig = QAFTConfig(),
                  train: TrainConfig = TrainConfig()) -> tuple[QAFTConfig, TrainConfig]:
    """`config` and `train` with the fields one trial drew (e.g. from QAFT_SEARCH_SPACE) set."""
    q_fields = {f.name for f in dataclasses.fields(QAFTConfig)}
    t_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(trial) - q_fields - t_fields)
    if unknown:
        raise OptionsError(f"trial fields {unknown} are neither QAFTConfig's nor TrainConfig's; "
                           f"the search space has {sorted(QAFT_SEARCH_SPACE)}")
    return (dataclasses.replace(config, **{k: v for k, v in trial.items() if k in q_fields}),
            dataclasses.replace(train, **{k: v for k, v in trial.items() if k in t_fields}))


def _fp_teacher(model: nn.Module, train: TrainConfig, teacher: nn.Module | None):
    """The frozen FP teacher of loss kd: `teacher` if given, else a deep copy of `model` as it
    is now (call before a GPTQ start or prepare), in eval mode without gradients. It holds a
    second copy of the weights (0.54 GB for a 135M-parameter model in float32)."""
    if train.loss != "kd" or teacher is not None:
        return teacher
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


@dataclass
class FinetuneResult:
    model: nn.Module
    codes: dict[str, QuantizedTensor] | None  # None for the FP control
    train: TrainResult
    info: dict  # mode, configs, seconds (gptq_seconds for a GPTQ start), notes
    start: dict | None = None  # a GPTQ start {layer: QuantizedTensor}, for a later trial


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
                  progress: bool = True, teacher: nn.Module | None = None,
                  solution: dict | None = None, **train_kwargs) -> FinetuneResult:
    """QAFT: fake-quantize the selected layers (qaft.prepare), train with the STE, snap onto the
    grid (qaft.convert). With init "gptq", `solution` {layer: QuantizedTensor} is a GPTQ solution
    of this same model on these same blocks computed before (e.g. by an earlier trial); without
    it GPTQ runs here (its options `gptq`). local_inputs {layer: X (m, in)}: record each layer's local loss against
    its FP weight during training. With train.loss "kd" the teacher is `teacher`, or else a deep
    copy of `model` made before the GPTQ start and prepare (one more copy of the weights in
    memory for the whole run). train_kwargs go to `qaft.train.finetune` (checkpoints,
    validate_fn)."""
    spec = parse_spec(spec)
    if gptq is not None and config.init != "gptq":
        raise OptionsError(f"GPTQ options were given but init is {config.init!r}; they apply to "
                           "init gptq only: use QAFTConfig(init='gptq') or leave gptq= out")
    t0 = time.perf_counter()
    info = {"mode": "qaft", "qaft": {**asdict(config), "scale_mode": config.scales},
            "train": asdict(train)}
    teacher = _fp_teacher(model, train, teacher)  # before a GPTQ start or prepare, too
    reference = None
    if local_inputs:  # the FP weights, before a GPTQ start or prepare changes them
        reference = {n: linear_weight(m).detach().clone()
                     for n, m in select_linears(model, filter_fn) if n in local_inputs}
    if solution is not None and (config.init != "gptq" or gptq is not None):
        raise OptionsError("solution= is the GPTQ start itself: give it with init 'gptq' and "
                           "without gptq= options")
    if config.init == "gptq" and solution is None:
        solution = _gptq_start(model, blocks, spec, gptq, filter_fn, progress, info)
    prepare(model, spec, config, filter_fn=filter_fn, solution=solution)
    result = finetune(model, blocks, train, local_inputs=local_inputs, local_reference=reference,
                      eval_fn=eval_fn, progress=progress, teacher=teacher, **train_kwargs)
    codes = convert(model)
    info["seconds"] = time.perf_counter() - t0
    return FinetuneResult(model, codes, result, info, solution)


def finetune_lora(model: nn.Module, blocks, spec: QuantSpec | str,
                  lora: LoraOptions = LoraOptions(), train: TrainConfig = TrainConfig(), *,
                  gptq: GPTQOptions | None = None, filter_fn: FilterFn | None = None,
                  eval_fn=None, progress: bool = True, teacher: nn.Module | None = None,
                  **train_kwargs) -> FinetuneResult:
    """LoRA adapters on a frozen base snapped onto the grid (RTN or GPTQ), trained, merged and
    re-quantized with RTN: the returned model is that re-quantized one (info["note"]). With
    train.loss "kd", the teacher is as in `finetune_qaft`."""
    spec = parse_spec(spec)
    if gptq is not None and lora.init != "gptq":
        raise OptionsError(f"GPTQ options were given but the LoRA init is {lora.init!r}; they "
                           "apply to init gptq only: use LoraOptions(init='gptq') or leave "
                           "gptq= out")
    t0 = time.perf_counter()
    info = {"mode": "lora", "lora": asdict(lora), "train": asdict(train), "note": MERGED_NOTE}
    teacher = _fp_teacher(model, train, teacher)
    solution = (_gptq_start(model, blocks, spec, gptq, filter_fn, progress, info)
                if lora.init == "gptq" else None)
    peft_model = prepare_lora(model, spec, lora, filter_fn=filter_fn, init=solution)
    result = finetune(peft_model, blocks, train, eval_fn=eval_fn, progress=progress,
                      teacher=teacher, **train_kwargs)
    model, codes = merge_and_requantize(peft_model, spec, filter_fn=filter_fn)
    info["seconds"] = time.perf_counter() - t0
    return FinetuneResult(model, codes, result, info)


def finetune_fp(model: nn.Module, blocks, train: TrainConfig = TrainConfig(), *, eval_fn=None,
                progress: bool = True, **train_kwargs) -> FinetuneResult:
    """The FP control: the same loop, schedule and blocks, no quantization. Loss kd needs
    teacher= in train_kwargs (another FP model): distilling the model from a copy of itself has
    zero loss and zero gradient."""
    if train.loss == "kd" and train_kwargs.get("teacher") is None:
        raise OptionsError("loss kd in the FP control would distill the model from a copy of "
                           "itself (KL 0, gradient 0 at every step): pass teacher= another FP "
                           "model, or use loss nll")
    t0 = time.perf_counter()
    result = finetune(model, blocks, train, eval_fn=eval_fn, progress=progress, **train_kwargs)
    return FinetuneResult(model, None, result, {"mode": "fp", "train": asdict(train),
                                                "seconds": time.perf_counter() - t0})
