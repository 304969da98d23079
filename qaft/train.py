"""Training loop for QAFT, its FP control and small-model pretraining, built on `accelerate`.

QAFT trains a model prepared with `qaft.prepare` (fake-quantized layers, STE) on the blocks a
`DataBudget` gave PTQ for calibration; the FP control trains the same model without fake
quantization on the same blocks with the same schedule; pretraining streams a larger corpus through
the same loop. The loop is the usual one: AdamW (weight decay on matrices only, see
`param_groups`), a learning-rate schedule (`qaft.schedules`: constant, cosine or WSD, with linear
warmup), gradient clipping, gradient accumulation, optional mixed precision, all seeded.

Data comes from a `qaft.data.DataSource`; a (n, seq_len) tensor is wrapped in `TokenBlocks`, a new
permutation from seed + epoch every epoch. The budget is `epochs`, `max_steps` or `max_tokens`;
the data cycles over as many epochs as the budget needs. Under `accelerate launch` or `torchrun`
with several processes it runs data-parallel (DDP): each process takes its batch_size rows of every
global batch of one seeded order, so the global batch equals a single-process run with
batch_size * world_size.

Every step records the training loss (the global loss on the batch), the learning rate, tokens
processed, unique tokens seen and wall time; every `local_every` steps, the relative local loss
||X W^T - X W_hat^T||^2 / ||X W^T||^2 of each fake-quantized layer on held-out calibration inputs
X against its FP weight W (`local_reference`); every `eval_every` steps, `eval_fn(model)` (e.g.
held-out NLL), stored as `eval_nll` when it returns a number, merged into the row when a dict.

With `checkpoint_dir`, a checkpoint (`qaft.checkpoints`) is written every `checkpoint_every` steps
and at the end; `resume=True` continues from the latest one with the same data order, optimizer,
schedule and RNG state, so the result is bit-identical to an uninterrupted run. `branch_from=` a
checkpoint of another run starts a new run there (a WSD cooldown from a stable-phase checkpoint):
the same state, data position and history, another schedule and budget, which must give the same
learning rates as the parent's at every step before the branch point.

Mixed precision is accelerate's on accelerators; fp16 on a CPU, which accelerate would silently
run in float32, uses torch's CPU autocast and gradient scaler here.

The loss is the next-token NLL of the blocks, or with loss "kd" the KL divergence from a frozen FP
`teacher` on the same blocks (`qaft.distill`); rows then hold the NLL of the batch too
(`batch_nll`). With `validate_every`, `validate_fn(model)` (a validation NLL) runs at step 0, every
`validate_every` steps and at the last step, recorded as `val_nll` (step 0 in a row of its own);
the trainable state at the best value is kept (a CPU copy) and restored at the end
(`restore_best`), and after `patience` validations without improvement the run stops early. The
best state and its step are part of the checkpoints, so a resumed run keeps them.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.errors import OptionsError
from ptq.metrics import relative_output_error

from .checkpoints import (checkpoint_meta, latest_checkpoint, load_checkpoint, rng_state,
                          save_checkpoint, set_rng_state)
from .continuation import check_branch, check_resume
from .data import DataSource, TokenBlocks
from .distill import LOSSES, causal_nll, kd_loss
from .fake_quant import FakeQuantLinear, fake_quant_layers
from .schedules import SCHEDULES, lr_factor

__all__ = ["TrainConfig", "TrainResult", "finetune", "fused_adam", "lr_factor", "param_groups",
           "SCHEDULES", "DataSource", "TokenBlocks"]


@dataclass(frozen=True)
class TrainConfig:
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate of AdamW"})
    epochs: int = field(default=1, metadata={
        "help": "passes over the token blocks; the budget unless max_steps or max_tokens is set "
                "(then leave it at 1)"})
    max_steps: int = field(default=0, metadata={
        "help": "budget in optimizer steps, cycling over the data as needed (0: use epochs)"})
    max_tokens: int = field(default=0, metadata={
        "help": "budget in tokens over all processes, rounded down to whole optimizer steps "
                "(0: use epochs)"})
    batch_size: int = field(default=1, metadata={"help": "blocks per process per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    schedule: str = field(default="constant", metadata={"help": "constant, cosine or wsd"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup optimizer steps"})
    decay_fraction: float = field(default=0.2, metadata={
        "help": "wsd: fraction of steps in the final linear decay"})
    decay_steps: int = field(default=0, metadata={
        "help": "wsd: steps of the final linear decay, instead of decay_fraction (0: use "
                "decay_fraction); a cooldown branch sets it"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "cosine/wsd: final learning rate as a fraction of the peak"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    decay_all_params: bool = field(default=False, metadata={
        "help": "apply weight decay to biases, norms, embeddings and LSQ scales too"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    mixed_precision: str = field(default="no", metadata={
        "help": "no, bf16 or fp16 autocast (fp16 with a gradient scaler; on a CPU fp16 matmuls "
                "run an order of magnitude slower than bf16)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order"})
    local_every: int = field(default=0, metadata={
        "help": "record each layer's local loss every k steps (0: never)"})
    eval_every: int = field(default=0, metadata={
        "help": "run eval_fn every k steps (0: never)"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "write a checkpoint to checkpoint_dir every k optimizer steps and at the end "
                "(0: only at the end)"})
    keep_checkpoints: int = field(default=1, metadata={
        "help": "how many of the latest checkpoints to keep"})
    loss: str = field(default="nll", metadata={
        "help": "nll (next-token NLL of the blocks) or kd (KL from the frozen FP model's "
                "next-token distributions on the same blocks; QAFT and LoRA keep a copy of the FP "
                "model as teacher: one more copy of the weights in memory)"})
    validate_every: int = field(default=0, metadata={
        "help": "run validate_fn at step 0, every k optimizer steps and at the last step, and "
                "keep the state of the best validation NLL (0: never)"})
    patience: int = field(default=0, metadata={
        "help": "stop after this many validations without improvement (0: never stop early; "
                "the best state is kept all the same)"})
    restore_best: bool = field(default=True, metadata={
        "help": "with validate_every: end with the state of the best validation (false: the "
                "last state; the best is recorded either way)"})

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise OptionsError(f"schedule={self.schedule!r}: use one of {SCHEDULES}")
        if self.loss not in LOSSES:
            raise OptionsError(f"loss={self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise OptionsError(f"mixed_precision={self.mixed_precision!r}: use no, bf16 or fp16")
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise OptionsError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("max_steps", "max_tokens", "warmup_steps", "decay_steps", "local_every",
                     "eval_every",
                     "checkpoint_every", "validate_every", "patience"):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name}={getattr(self, name)} must be >= 0 (0: "
                                   f"{'none' if name == 'warmup_steps' else 'off'})")
        budgets = [f"{n}={getattr(self, n)}" for n in ("max_steps", "max_tokens")
                   if getattr(self, n)]
        if self.epochs != 1:
            budgets.insert(0, f"epochs={self.epochs}")
        if len(budgets) > 1:
            raise OptionsError(f"{' and '.join(budgets)} each set the training budget; set one: "
                               "epochs, or max_steps, or max_tokens (leave max_steps and "
                               "max_tokens at 0 and epochs at 1 when unused)")
        # `not x > 0` also refuses NaN, which compares false with everything
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OptionsError(f"lr={self.lr} must be positive and finite, e.g. 1e-5")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise OptionsError(f"weight_decay={self.weight_decay} must be >= 0 and finite "
                               "(0: no decay)")
        if not self.grad_clip >= 0:
            raise OptionsError(f"grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise OptionsError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise OptionsError(f"decay_fraction={self.decay_fraction} must lie in (0, 1]")
        if self.patience and not self.validate_every:
            raise OptionsError(f"patience={self.patience} counts validations, and "
                               "validate_every=0 runs none; set validate_every (and pass "
                               "validate_fn), or leave patience at 0")


@dataclass
class TrainResult:
    history: list[dict]
    config: dict
    steps: int
    tokens_processed: int
    unique_tokens: int
    seconds: float  # wall time of the whole run, summed over its resumed parts
    world_size: int = 1
    resumed_from: int = 0  # the optimizer step a resumed or branched run started at
    # with validate_every: the step (0: before training) and value of the best validation, and
    # whether patience ran out before the budget did
    best_step: int | None = None
    best_val_nll: float | None = None
    stopped_early: bool = False


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


def finetune(model: nn.Module, blocks: torch.Tensor | DataSource,
             config: TrainConfig = TrainConfig(), *,
             local_inputs: dict[str, torch.Tensor] | None = None,
             local_reference: dict[str, torch.Tensor] | None = None,
             eval_fn: Callable[[nn.Module], float | dict] | None = None,
             progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
             resume: bool = False, teacher: nn.Module | None = None,
             validate_fn: Callable[[nn.Module], float] | None = None,
             branch_from: str | os.PathLike | None = None) -> TrainResult:
    """Train `model` (fake-quantized or not) on `blocks` as `config` says.

    blocks: the (n, seq_len) token blocks, or a `qaft.data.DataSource`.
    local_inputs: {layer name: X (m, in)} held-out inputs of fake-quantized layers, and
    local_reference: {layer name: FP weight (out, in)}, for the local-loss record.
    checkpoint_dir: where checkpoints go; resume: continue from its latest checkpoint if any.
    branch_from: a checkpoint folder (step-*) of another run to start from with this config (see
    the module docstring); once the branch has checkpoints of its own, resume continues those.
    teacher: with loss "kd", the frozen FP model (same vocabulary), put in eval mode and on the
    training device; its logits are computed per micro-batch under no_grad, in the same mixed
    precision as the student. It costs its weights' memory and one forward per micro-batch
    (about a third of a step), and is not part of the checkpoints: pass the same one to resume.
    validate_fn: with validate_every, callable(model) -> validation NLL, run in eval mode under
    no_grad (the main process's value decides for all); the best trainable state is kept as a
    CPU copy (one more copy of the trained weights) and written into the checkpoints too.
    Dropout draws from the caller's global torch RNG, as in any torch loop; a resumed run restores
    the state the checkpoint saved. The model is trained in place and returned unwrapped.
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object

    source = TokenBlocks(blocks) if isinstance(blocks, torch.Tensor) else blocks
    if not isinstance(source, DataSource):
        raise OptionsError(f"blocks is a {type(blocks).__name__}; give a (n, seq_len) token "
                           "tensor or a qaft.data.DataSource (seq_len, num_blocks, batches)")
    if checkpoint_dir is None and (resume or config.checkpoint_every or branch_from):
        raise OptionsError("resume, checkpoint_every and branch_from need checkpoint_dir= to "
                           "read and write checkpoints")
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if latest is not None and not resume:
        raise OptionsError(f"{checkpoint_dir} already holds the checkpoint {latest.name}; pass "
                           "resume=True to continue that run, or use an empty checkpoint_dir")
    branching = branch_from is not None and latest is None
    if branching:
        latest = Path(branch_from)
        if not (latest / "train.json").is_file():
            raise OptionsError(f"branch_from={branch_from} is not a training checkpoint (no "
                               "train.json); give a step-* folder written by a run with "
                               "checkpoint_dir")
    references = _local_references(model, local_inputs, local_reference)
    _check_extras(model, config, teacher, validate_fn)
    kd, validating = config.loss == "kd", config.validate_every > 0

    # Without an accelerator, cpu=True is what lets accelerate run several CPU processes (gloo)
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    # accelerate runs fp16 on a CPU silently in float32: that case is torch's autocast here
    cpu_fp16 = on_cpu and config.mixed_precision == "fp16"
    precision = "no" if cpu_fp16 else config.mixed_precision
    _fresh_accelerator_state(precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=on_cpu,
                              gradient_accumulation_steps=config.grad_accum)
    if cpu_fp16:
        scaler = torch.amp.GradScaler("cpu")
        autocast = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
        student_autocast = autocast
    else:  # accelerate's prepared model autocasts its own forward
        scaler, autocast, student_autocast = accelerator.scaler, accelerator.autocast, \
            contextlib.nullcontext
    world, rank = accelerator.num_processes, accelerator.process_index
    seq_len = source.seq_len
    per_step = config.batch_size * world  # blocks per micro-step across processes
    total_steps = _total_steps(config, source, per_step)

    params = [p for p in model.parameters() if p.requires_grad]  # clipped in this order
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.lr,
                                  fused=fused_adam(params))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config))
    # Position and bookkeeping: (epoch, batch) is the next global batch to read.
    step, epoch, batch_index, tokens, elapsed = 0, 0, 0, 0, 0.0
    history: list[dict] = []
    seen: set[int] = set()
    saved_rng = None
    # validation: the best value, its step and trainable state, validations since, stopped?
    best_val, best_step, best_state, bad_evals, stopped_early = None, None, None, 0, False
    origin = str(latest) if branching else None
    if latest is not None:
        meta = checkpoint_meta(latest)
        if branching:  # before touching the model
            check_branch(meta, config, world, source, latest, total_steps,
                         lambda parent: _total_steps(parent, source, per_step))
        else:
            check_resume(meta, config, world, source, latest)
            origin = meta.get("branched_from")
        tensors = load_checkpoint(latest, model)
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        step, epoch, batch_index = meta["step"], meta["epoch"], meta["next_batch"]
        tokens, elapsed, history = meta["tokens_processed"], meta["seconds"], meta["history"]
        seen = set(tensors["seen"].tolist())
        saved_rng = tensors["rng"][rank]
        if branching:  # the branch's own rate from its first step on (the parent set its own)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(step, total_steps, config)
        if validating and not branching:
            best = meta["best"]
            best_val, best_step, bad_evals = best["val_nll"], best["step"], best["bad_evals"]
            stopped_early, best_state = best["stopped_early"], tensors.get("best")
    resumed_from = step
    model.train()
    # the scheduler stays outside accelerate, which would step it once per process
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    if latest is not None:
        if scaler is not None and "scaler" in tensors:
            scaler.load_state_dict(tensors["scaler"])
        set_rng_state(saved_rng, accelerator.device)  # last, after anything that might draw
    if teacher is not None:
        teacher.eval().to(accelerator.device)

    def validate() -> float:
        """Run validate_fn, track the best state; the main process's value decides for all."""
        nonlocal best_val, best_step, best_state, bad_evals, stopped_early
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        with torch.no_grad():
            value = float(validate_fn(unwrapped))
        unwrapped.train()
        value = broadcast_object_list([value])[0]
        if not math.isnan(value) and (best_val is None or value < best_val):
            best_val, best_step, bad_evals = value, step, 0
            best_state = _trainable_state(unwrapped)
        else:
            bad_evals += 1
            stopped_early = (bool(config.patience) and bad_evals >= config.patience
                             and step < total_steps)  # at the last step it simply ends
        return value

    def write_checkpoint():
        rngs = gather_object([rng_state(accelerator.device)])  # every process's own state
        if accelerator.is_main_process:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": rngs, "seen": torch.tensor(sorted(seen), dtype=torch.long)}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            meta = {"config": asdict(config), "world_size": world, "branched_from": origin,
                    "data": [source.num_blocks, seq_len], "step": step, "epoch": epoch,
                    "next_batch": batch_index, "tokens_processed": tokens,
                    "seconds": elapsed + time.perf_counter() - t0, "history": history}
            if validating:
                if best_state is not None:
                    state["best"] = best_state
                meta["best"] = {"val_nll": best_val, "step": best_step, "bad_evals": bad_evals,
                                "stopped_early": stopped_early}
            save_checkpoint(checkpoint_dir, step, accelerator.unwrap_model(model), state, meta,
                            keep=config.keep_checkpoints)
        accelerator.wait_for_everyone()

    t0 = time.perf_counter()
    if validating and latest is None:  # step 0: no training at all may be best
        value = validate()
        history.append({"step": 0, "epoch": 0, "tokens_processed": 0, "unique_tokens": 0,
                        "seconds": time.perf_counter() - t0, "val_nll": value})
    with tqdm(total=total_steps, initial=step, desc="finetune",
              disable=not (progress and accelerator.is_main_process)) as bar:
        while step < total_steps and not stopped_early:
            read_any = False
            for ids, batch in source.batches(config.seed, epoch, per_step, batch_index):
                read_any = True
                batch_index += 1
                seen.update(ids.tolist())
                mine = batch[rank * config.batch_size:(rank + 1) * config.batch_size]
                mine = mine.to(accelerator.device)
                with accelerator.accumulate(model):
                    if kd:
                        with student_autocast():
                            logits = model(input_ids=mine, use_cache=False).logits
                        with torch.no_grad(), autocast():
                            target = teacher(input_ids=mine, use_cache=False).logits
                        loss = kd_loss(logits, target)
                        nll = causal_nll(logits.detach(), mine)
                    else:
                        with student_autocast():
                            loss = model(input_ids=mine, labels=mine, use_cache=False).loss
                    accelerator.backward(scaler.scale(loss) if cpu_fp16 else loss)
                    if cpu_fp16 and accelerator.sync_gradients:
                        scaler.unscale_(optimizer)  # clip and step on the true gradients
                    if accelerator.sync_gradients and config.grad_clip > 0:
                        accelerator.clip_grad_norm_(params, config.grad_clip)
                    if not cpu_fp16:
                        prepared_optimizer.step()
                    elif accelerator.sync_gradients:
                        scaler.step(optimizer)  # skipped when the gradients overflowed
                        scaler.update()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    prepared_optimizer.zero_grad()
                tokens += per_step * seq_len
                mean_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
                if kd:
                    mean_nll = float(accelerator.reduce(nll, reduction="mean"))
                if not accelerator.sync_gradients:
                    continue
                seconds = elapsed + time.perf_counter() - t0
                row = {"step": step + 1, "epoch": epoch, "loss": mean_loss,
                       "lr": config.lr * lr_factor(step, total_steps, config),
                       "tokens_processed": tokens, "unique_tokens": len(seen) * seq_len,
                       "seconds": seconds}
                if kd:
                    row["batch_nll"] = mean_nll  # the plain NLL of the same batch and logits
                step += 1
                if references and config.local_every and step % config.local_every == 0:
                    layers = fake_quant_layers(accelerator.unwrap_model(model))
                    with torch.no_grad():
                        row["local"] = {
                            name: relative_output_error(
                                W.to(accelerator.device), layers[name].quantized_weight(),
                                local_inputs[name].to(accelerator.device))
                            for name, W in references.items()}
                if eval_fn is not None and config.eval_every and step % config.eval_every == 0:
                    unwrapped = accelerator.unwrap_model(model)
                    unwrapped.eval()
                    measured = eval_fn(unwrapped)
                    row.update(measured if isinstance(measured, dict)
                               else {"eval_nll": float(measured)})
                    unwrapped.train()
                if validating and (step % config.validate_every == 0 or step == total_steps):
                    row["val_nll"] = validate()
                history.append(row)
                # after eval, so that the checkpoint holds the complete row and the RNG as the
                # next step will find it
                if checkpoint_dir is not None and (step == total_steps or stopped_early or (
                        config.checkpoint_every and step % config.checkpoint_every == 0)):
                    write_checkpoint()
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
                if step >= total_steps or stopped_early:
                    break
            else:  # the epoch is exhausted: the next one, in a new order
                if not read_any and batch_index == 0:
                    raise OptionsError(f"the data source gave no full batch of {per_step} blocks "
                                       f"in epoch {epoch}; give more blocks or a smaller batch")
                epoch, batch_index = epoch + 1, 0
    # without accelerate's autocast wrapper: the trained model computes in its own dtype after
    # training, like any model (evaluating it in float32 under a leftover bf16 autocast would
    # report a bf16 loss as the float32 model's)
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if validating and config.restore_best and best_state is not None:
        _load_trainable_state(model, best_state)
    model.eval()
    return TrainResult(history, asdict(config), step, tokens, len(seen) * seq_len,
                       elapsed + time.perf_counter() - t0, world, resumed_from, best_step,
                       best_val, stopped_early)
