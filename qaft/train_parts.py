"""The pieces of the training loop (`qaft.train.finetune`) that are not the loop itself.

What it builds before the first step: the AdamW parameter groups (`param_groups`: weight decay on
weight matrices only) and whether to use the fused kernel (`fused_adam`); the number of optimizer
steps a budget gives (`_total_steps`); the FP weights the local loss is measured against
(`_local_references`); the checks of the teacher and validation arguments (`_check_extras`); a
fresh accelerate state (`_fresh_accelerator_state`). And the CPU copy of the trainable state that
validation keeps at its best value and restores at the end (`_trainable_state`,
`_load_trainable_state`).
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.errors import OptionsError

from .data import DataSource
from .fake_quant import FakeQuantLinear, fake_quant_layers
from .train_config import TrainConfig

__all__ = ["fused_adam", "param_groups"]


def fused_adam(params) -> bool | None:
    """True where every parameter lies on a device with PyTorch's fused Adam/AdamW kernel (CPU,
    CUDA): one pass over each parameter instead of a dozen, 0.09 s against 0.28-0.31 s per
    step for SmolLM2-135M on the 2-core CPU (benchmarks/qaft_step.py); the values agree with the
    default implementation to float32 rounding. None (the default) elsewhere."""
    return True if all(p.device.type in ("cpu", "cuda") for p in params) else None


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices only.

    Biases and normalization gains (ndim < 2), embeddings (every nn.Embedding's parameters, so a
    tied lm_head too) and LSQ scales and zero points get none: decay pulls them toward 0, which
    changes what the layer computes (a norm gain or a quantization step of 0) instead of
    regularizing it. With
    config.decay_all_params every trainable parameter is decayed, in one group.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.decay_all_params:
        return [{"params": trainable, "weight_decay": config.weight_decay}]
    exempt = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            exempt.update(id(p) for p in module.parameters(recurse=False))
        if isinstance(module, FakeQuantLinear):
            exempt.update(id(t) for t in (module.scale, module.zero)
                          if isinstance(t, nn.Parameter))
    decay = [p for p in trainable if p.ndim >= 2 and id(p) not in exempt]
    no_decay = [p for p in trainable if p.ndim < 2 or id(p) in exempt]
    return [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _total_steps(config: TrainConfig, source: DataSource, per_step: int) -> int:
    """Optimizer steps of the budget; per_step = blocks per micro-step over all processes."""
    if source.num_blocks is not None and source.num_blocks < per_step:
        raise OptionsError(f"{source.num_blocks} blocks cannot fill one global batch of "
                           f"{per_step} (batch_size {config.batch_size} x "
                           f"{per_step // config.batch_size} processes); lower batch_size or "
                           "give more blocks")
    if config.max_steps:
        return config.max_steps
    if config.max_tokens:
        step_tokens = per_step * config.grad_accum * source.seq_len
        if config.max_tokens < step_tokens:
            raise OptionsError(f"max_tokens={config.max_tokens} is less than one optimizer step "
                               f"of {step_tokens} tokens; raise it or lower batch_size/grad_accum")
        return config.max_tokens // step_tokens  # never past the budget
    if source.num_blocks is None:
        raise OptionsError("a data source of unknown length (num_blocks None) cannot count "
                           "epochs; set max_steps or max_tokens")
    micro_per_epoch = source.num_blocks // per_step  # the source drops the incomplete batch
    total = (micro_per_epoch * config.epochs) // config.grad_accum
    if total < 1:
        raise OptionsError(f"{config.epochs} epoch(s) of {micro_per_epoch} micro-steps give no "
                           f"optimizer step with grad_accum={config.grad_accum}")
    return total


def _local_references(model: nn.Module, local_inputs, local_reference) -> dict[str, torch.Tensor]:
    """{name: FP weight (out, in)} of the fake-quantized layers that have held-out inputs."""
    if not local_inputs:
        return {}
    if local_reference is None:
        raise OptionsError("local_inputs needs local_reference={layer name: FP weight (out, in)}: "
                           "the local loss is measured against the FP weight; copy the weights "
                           "before qaft.prepare (a GPTQ init overwrites them)")
    layers = fake_quant_layers(model)
    refs = {}
    for name in (n for n in local_inputs if n in layers):
        if name not in local_reference:
            raise OptionsError(f"local_reference has no FP weight for {name}; give one for every "
                               "fake-quantized layer in local_inputs")
        with torch.no_grad():
            shape = layers[name].quantized_weight().shape
        if local_reference[name].shape != shape:
            raise OptionsError(f"local_reference[{name!r}] is {tuple(local_reference[name].shape)}"
                               f"; the layer's weight is (out, in) = {tuple(shape)}")
        refs[name] = local_reference[name].detach()
    return refs


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of everything training changes: the parameters with requires_grad, and the
    scale/zero buffers of the fake-quantized layers."""
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
             if p.requires_grad}
    for name, fq in fake_quant_layers(model).items():
        for b, t in fq.named_buffers(recurse=False):
            state[f"{name}.{b}" if name else b] = t.detach().to("cpu", copy=True)
    return state


@torch.no_grad()
def _load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, value in state.items():
        tensors[name].copy_(value)


def _check_extras(model, config: TrainConfig, teacher, validate_fn) -> None:
    if config.loss == "kd" and teacher is None:
        raise OptionsError("loss kd distills from a frozen FP model: pass teacher= (a copy of the "
                           "model made before qaft.prepare; qaft.finetune_qaft makes one)")
    if teacher is not None and config.loss != "kd":
        raise OptionsError(f"a teacher was given but loss is {config.loss!r}; set "
                           "TrainConfig(loss='kd'), or leave teacher out")
    if teacher is not None and teacher is model:
        raise OptionsError("the teacher is the model being trained (its KL to itself is 0); pass "
                           "a frozen copy, e.g. copy.deepcopy(model) before qaft.prepare")
    if config.validate_every and validate_fn is None:
        raise OptionsError(f"validate_every={config.validate_every} needs validate_fn=, a "
                           "callable(model) -> validation NLL")
    if validate_fn is not None and not config.validate_every:
        raise OptionsError("validate_fn is called every validate_every steps, and "
                           "validate_every is 0: set TrainConfig(validate_every=k), or leave "
                           "validate_fn out")


def _fresh_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with
    another mixed precision; a library called twice (fp32, then bf16) must not fail for that.
    Only the accelerator part is reset: the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and \
            str(AcceleratorState().mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
