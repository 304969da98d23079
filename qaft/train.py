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

This file holds the loop; its options and result (`TrainConfig`, `TrainResult`) are in
`qaft.train_config`, and the AdamW groups, the step budget and the other pieces it builds before
the first step in `qaft.train_parts`. All of them can still be imported from here.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict
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
from .distill import causal_nll, kd_loss
from .fake_quant import fake_quant_layers
from .schedules import lr_factor
from .train_config import SCHEDULES, TrainConfig, TrainResult
from .train_parts import (_check_extras, _fresh_accelerator_state, _load_trainable_state,
                          _local_references, _total_steps, _trainable_state, fused_adam,
                          param_groups)

__all__ = ["TrainConfig", "TrainResult", "finetune", "fused_adam", "lr_factor", "param_groups",
           "SCHEDULES", "DataSource", "TokenBlocks"]


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
                bar.set_postfix(loss=f"{mean_loss:.3f}",
                                tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
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
