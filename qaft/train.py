"""Fine-tuning loop on a fixed set of token blocks, built on `accelerate`.

QAFT trains a model prepared with `qaft.prepare` (fake-quantized layers, STE) on exactly the
blocks a `DataBudget` gave PTQ for calibration, for a number of epochs; the FP control trains the
same model without fake quantization on the same blocks with the same schedule. The loop is the
usual one: AdamW, a learning-rate schedule (constant, cosine or WSD, with linear warmup), gradient
clipping, gradient accumulation, optional mixed precision, all seeded. Under `accelerate launch`
or `torchrun` with several processes it runs data-parallel (DDP): each process takes every
world_size-th batch of one seeded order, so the global batch equals a single-process run with
batch_size * world_size.

Every step records the training loss (the global loss on the batch), the learning rate, tokens
processed, unique tokens seen and wall time; every `local_every` steps, the relative local loss
||X W^T - X W_hat^T||^2 / ||X W^T||^2 of each fake-quantized layer on held-out calibration inputs
X against its original FP weight W; every `eval_every` steps, `eval_fn(model)` (e.g. held-out NLL),
stored as `eval_nll` when it returns a number, merged into the row when it returns a dict.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.metrics import relative_output_error

from .fake_quant import fake_quant_layers

__all__ = ["TrainConfig", "TrainResult", "finetune", "lr_factor"]

SCHEDULES = ("constant", "cosine", "wsd")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate of AdamW"})
    epochs: int = field(default=1, metadata={"help": "passes over the token blocks"})
    batch_size: int = field(default=1, metadata={"help": "blocks per process per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    schedule: str = field(default="constant", metadata={"help": "constant, cosine or wsd"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup optimizer steps"})
    decay_fraction: float = field(default=0.2, metadata={
        "help": "wsd: fraction of steps in the final linear decay"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "cosine/wsd: final learning rate as a fraction of the peak"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16"})
    seed: int = field(default=0, metadata={"help": "seed of the data order"})
    local_every: int = field(default=0, metadata={
        "help": "record each layer's local loss every k steps (0: never)"})
    eval_every: int = field(default=0, metadata={
        "help": "run eval_fn every k steps (0: never)"})

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: use one of {SCHEDULES}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: use no, bf16 or fp16")
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and 0 < decay_fraction <= 1")


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(round(cfg.decay_fraction * total), 1)  # wsd: warmup, stable, decay
    start = total - decay_steps
    if step < start:
        return 1.0
    return lo + (1 - lo) * (1 - (step - start + 1) / decay_steps)


@dataclass
class TrainResult:
    history: list[dict]
    config: dict
    steps: int
    tokens_processed: int
    unique_tokens: int
    seconds: float
    world_size: int = 1


def finetune(model: nn.Module, blocks: torch.Tensor, config: TrainConfig = TrainConfig(), *,
             local_inputs: dict[str, torch.Tensor] | None = None,
             eval_fn: Callable[[nn.Module], float | dict] | None = None,
             progress: bool = True) -> TrainResult:
    """Train `model` (fake-quantized or not) on `blocks` (n, seq_len) as `config` says.

    local_inputs: {layer name: X (m, in)} held-out inputs of fake-quantized layers, for the
    local-loss record. The model is trained in place and returned unwrapped.
    """
    from accelerate import Accelerator

    # Without an accelerator, cpu=True is what lets accelerate run several CPU processes (gloo)
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=on_cpu,
                              gradient_accumulation_steps=config.grad_accum)
    world = accelerator.num_processes
    n, seq_len = blocks.shape
    per_step = config.batch_size * world  # blocks per micro-step across processes
    if n < per_step:
        raise ValueError(f"{n} blocks cannot fill one global batch of {per_step} "
                         f"(batch_size {config.batch_size} x {world} processes)")
    micro_per_epoch = n // per_step  # incomplete last global batch dropped: equal batches
    total_steps = (micro_per_epoch * config.epochs) // config.grad_accum
    if total_steps < 1:
        raise ValueError(f"{config.epochs} epoch(s) of {micro_per_epoch} micro-steps give no "
                         f"optimizer step with grad_accum={config.grad_accum}")

    references = {}
    if local_inputs:
        for name, fq in fake_quant_layers(model).items():
            if name in local_inputs:
                references[name] = fq.weight.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config))
    model.train()
    # the scheduler stays outside accelerate, which would step it once per process
    model, optimizer = accelerator.prepare(model, optimizer)
    history: list[dict] = []
    seen: set[int] = set()
    tokens = 0
    step = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, desc="finetune", disable=not (progress and
                                                               accelerator.is_main_process))
    rank = accelerator.process_index
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch))
        for micro in range(micro_per_epoch):
            if step >= total_steps:
                break
            idx = order[micro * per_step:(micro + 1) * per_step]
            seen.update(idx.tolist())
            mine = idx[rank * config.batch_size:(rank + 1) * config.batch_size]
            batch = blocks[mine].to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip > 0:
                    accelerator.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            tokens += per_step * seq_len
            mean_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
            if not accelerator.sync_gradients:
                continue
            row = {"step": step + 1, "epoch": epoch, "loss": mean_loss,
                   "lr": config.lr * lr_factor(step, total_steps, config),
                   "tokens_processed": tokens, "unique_tokens": len(seen) * seq_len,
                   "seconds": time.perf_counter() - t0}
            step += 1
            if references and config.local_every and step % config.local_every == 0:
                layers = fake_quant_layers(accelerator.unwrap_model(model))
                row["local"] = {name: relative_output_error(references[name],
                                                          layers[name].quantized_weight().detach(),
                                                          local_inputs[name].to(accelerator.device))
                                for name in references}
            if eval_fn is not None and config.eval_every and step % config.eval_every == 0:
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.eval()
                measured = eval_fn(unwrapped)
                row.update(measured if isinstance(measured, dict) else {"eval_nll": float(measured)})
                unwrapped.train()
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}",
                            tok_s=f"{tokens / max(row['seconds'], 1e-9):.0f}")
    bar.close()
    model = accelerator.unwrap_model(model)
    model.eval()
    return TrainResult(history, asdict(config), step, tokens, len(seen) * seq_len,
                       time.perf_counter() - t0, world)
