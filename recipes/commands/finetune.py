"""Command-line wiring of fine-tuning on a PTQ budget: QAFT (STE), QLoRA-style LoRA, FP control.

    qalign finetune --spec int3-g64 --samples 128 --seq-len 512 --epochs 1 --out runs/qaft-int3
    qalign finetune --mode fp --samples 128 --seq-len 512 --out runs/fp-ft

Flags map 1:1 onto the library's dataclasses (recipes.shared.flags): TrainConfig (`--lr`,
`--epochs`, ...), QAFTConfig (`--init`, `--scale-mode`, `--clipped-ste`: mode qaft only),
LoraOptions (`--lora-rank`, `--lora-init`, ...: mode lora only), GPTQOptions (`--gptq-damp`,
...: only with a GPTQ start). A flag that does not apply to the chosen mode is an error, never
silently ignored.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, replace

import qaft
from compare.data import budget_blocks, load_text
from compare.io import write_json
from compare.models import load_model
from ptq.checkpoint import save_quantized
from ptq.errors import OptionsError
from ptq.formats import parse_spec
from ptq.gptq import GPTQOptions
from qaft import FinetuneResult, LoraOptions, QAFTConfig, TrainConfig
from qaft.checkpoints import latest_checkpoint
from recipes.commands.args import DEFAULT_SEQ_LEN, seq_len_for
from recipes.shared.common import out_folder, resolve_device, versions
from recipes.shared.flags import add_dataclass_flags, flag_name, from_args, given_fields
from recipes.shared.quantization import CalibConfig

__all__ = ["MODES", "FinetuneSetup", "add_finetune_flags", "finetune_setup", "check_finetune_run",
           "run_finetune", "cmd_finetune"]

MODES = ("qaft", "lora", "fp")


@dataclass(frozen=True)
class FinetuneSetup:
    mode: str
    train: TrainConfig
    qaft: QAFTConfig | None = None
    lora: LoraOptions | None = None
    gptq: GPTQOptions | None = None


def add_finetune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="qaft",
                   help="qaft: fake-quant STE fine-tuning; lora: LoRA on a frozen quantized "
                        "base, merged and re-quantized; fp: the FP control (default: qaft)")
    add_dataclass_flags(p.add_argument_group("training"), TrainConfig)
    add_dataclass_flags(p.add_argument_group("QAFT (--mode qaft)"), QAFTConfig)
    add_dataclass_flags(p.add_argument_group("LoRA (--mode lora)"), LoraOptions, prefix="lora")
    add_dataclass_flags(p.add_argument_group("GPTQ start (--init gptq / --lora-init gptq)"),
                        GPTQOptions, prefix="gptq")


def _refuse(given: dict, prefix: str, why: str) -> None:
    if given:
        flags = ", ".join(flag_name(k, prefix) for k in given)
        raise OptionsError(f"{flags}: {why}")


def finetune_setup(args) -> FinetuneSetup:
    """The dataclasses the flags describe; flags that do not apply are errors."""
    mode = args.mode
    q_given = given_fields(QAFTConfig, args)
    l_given = given_fields(LoraOptions, args, prefix="lora")
    g_given = given_fields(GPTQOptions, args, prefix="gptq")
    train = from_args(TrainConfig, args)
    if mode != "qaft":
        _refuse(q_given, "", f"QAFT options do not apply to --mode {mode}")
    if mode != "lora":
        _refuse(l_given, "lora", f"LoRA options do not apply to --mode {mode}")
    q = QAFTConfig(**q_given) if mode == "qaft" else None
    lora = LoraOptions(**l_given) if mode == "lora" else None
    starts_from_gptq = (q is not None and q.init == "gptq") or (lora is not None
                                                               and lora.init == "gptq")
    if not starts_from_gptq:
        _refuse(g_given, "gptq", "GPTQ options apply only with --init gptq (qaft) or "
                                 "--lora-init gptq (lora)")
    gptq = GPTQOptions(**g_given) if starts_from_gptq else None
    return FinetuneSetup(mode, train, q, lora, gptq)


def check_finetune_run(setup: FinetuneSetup, device: str, samples: int, checkpoint_dir,
                       resume: bool) -> None:
    """What the training loop would refuse only after the model and text are loaded, checked
    before: fewer blocks than one batch, a checkpoint left by an earlier run."""
    train = setup.train
    if train.mixed_precision == "fp16" and device == "cpu":
        print("qalign: fp16 autocast on a CPU: float16 matmuls run an order of magnitude or more "
              "slower than bf16 here; --mixed-precision bf16 is the fast 16-bit choice",
              flush=True)
    if samples < train.batch_size:
        raise OptionsError(f"--samples {samples} blocks cannot fill one batch of --batch-size "
                           f"{train.batch_size}; lower --batch-size or raise --samples")
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if latest is not None and not resume:
        raise OptionsError(f"{checkpoint_dir} already holds the checkpoint {latest.name} of an "
                           "earlier run; add --resume to continue it, or choose another --out")


def run_finetune(model, blocks, spec: str | None, setup: FinetuneSetup, *, local_inputs=None,
                 eval_fn=None, progress: bool = True, **train_kwargs) -> FinetuneResult:
    """Fine-tune `model` in place as `setup` says (one qaft call per mode)."""
    if (setup.mode == "fp") != (spec is None):
        raise OptionsError("give --spec with --mode qaft or lora, and no --spec with --mode fp")
    if setup.mode == "fp":
        return qaft.finetune_fp(model, blocks, setup.train, eval_fn=eval_fn, progress=progress,
                                **train_kwargs)
    if setup.mode == "lora":
        return qaft.finetune_lora(model, blocks, spec, setup.lora, setup.train, gptq=setup.gptq,
                                  eval_fn=eval_fn, progress=progress, **train_kwargs)
    return qaft.finetune_qaft(model, blocks, spec, setup.qaft, setup.train, gptq=setup.gptq,
                              local_inputs=local_inputs, eval_fn=eval_fn, progress=progress,
                              **train_kwargs)


def cmd_finetune(args) -> None:
    setup = finetune_setup(args)
    spec = str(parse_spec(args.spec)) if args.spec else None
    if (setup.mode == "fp") != (spec is None):
        raise OptionsError("give --spec with --mode qaft or lora, and no --spec with --mode fp")
    out = out_folder(args.out)
    device = resolve_device(args.device)
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len or DEFAULT_SEQ_LEN,
                        seed=args.budget_seed)
    checkpoints = out / "checkpoints" if setup.train.checkpoint_every or args.resume else None
    check_finetune_run(setup, device, args.samples, checkpoints, args.resume)
    text = load_text(args.data)
    model, tokenizer = load_model(args.model, device=device,
                                  trust_remote_code=args.trust_remote_code)
    calib = replace(calib, seq_len=seq_len_for(model, args.seq_len))
    blocks = budget_blocks(tokenizer, text, calib.budget, args.add_bos)
    res = run_finetune(model, blocks, spec, setup, checkpoint_dir=checkpoints,
                       resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: every rank holds the same result
        return
    if res.codes is None:
        res.model.save_pretrained(out)
    else:
        save_quantized(res.model, res.codes, out, {"method": setup.mode,
                                                   "source_model": args.model})
    tokenizer.save_pretrained(out)
    train = res.train
    write_json(out / "qalign-finetune.json", {
        "source_model": args.model, "spec": spec, **res.info,
        "budget": {"data": args.data, **asdict(calib.budget),
                   "unique_tokens": calib.budget.unique_tokens},
        "steps": train.steps, "tokens_processed": train.tokens_processed,
        "unique_tokens": train.unique_tokens, "train_seconds": train.seconds,
        "history": train.history, "versions": versions()})
    print(f"{setup.mode} {spec or 'fp'}: {train.steps} steps, {train.tokens_processed:,} tokens "
          f"({train.unique_tokens:,} unique), final loss {train.history[-1]['loss']:.4f}, "
          f"{res.info['seconds']:.0f} s -> {out}")
