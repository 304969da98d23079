"""Cost of a fake-quant (STE) training step against a plain FP training step, same model, same run.

    python benchmarks/qaft_step.py --spec int2-g64 --seq-len 256 --steps 8

SmolLM2-135M, batch 1 x seq_len tokens of the embedded train split, AdamW, forward + backward +
optimizer step; float32 weights, computing in float32 or (--dtype bfloat16) under bfloat16
autocast, as the misalignment recipe fine-tunes on a CPU with AMX/AVX512-BF16. Reports the
median step time of each, their ratio, the peak RSS sampled during each phase, the time of the
fake quantization alone (all layers' W -> W_hat forward and the STE backward), which is the
overhead's floor, and one AdamW step over the trainable weights with the fused kernel the
toolkit uses and with PyTorch's default implementation. glibc's allocator is tuned first, as the
`qalign` command does (`ptq.allocator`), unless --default-allocator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import qaft
from compare.data import DataBudget, load_text, tokenize
from compare.memory import PeakRSS
from compare.models import load_model
from ptq.allocator import tune_allocator
from qaft.train import fused_adam


def steps(model, blocks, n: int, dtype: torch.dtype) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused_adam(params))  # as qaft.train does
    model.train()
    times = []
    for i in range(n):
        batch = blocks[i % len(blocks)][None]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def optimizer_step(params, fused, repeat: int = 3) -> float:
    """Best-of-`repeat` seconds of one AdamW step over `params` (gradients set to ones)."""
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused)
    opt.step()  # the state is allocated on the first step
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", default="int2-g64", help="fake-quant spec (default: int2-g64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per step (default: 256)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per phase (default: 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--scale-mode", default="dynamic", help="qaft scale mode (default: dynamic)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (bfloat16: autocast over float32 weights; default: "
                        "float32)")
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's malloc settings (default: tuned as the qalign command "
                        "tunes them)")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    tuned = not args.default_allocator and tune_allocator()
    dtype = getattr(torch, args.dtype)

    model, tok = load_model("smollm2-135m")
    blocks = DataBudget(args.steps + args.warmup, args.seq_len).blocks(
        tokenize(tok, load_text("wiki").train))
    report = {"spec": args.spec, "seq_len": args.seq_len, "scale_mode": args.scale_mode,
              "dtype": args.dtype, "threads": torch.get_num_threads(),
              "allocator": "tuned" if tuned else "default"}
    with PeakRSS() as mem:
        fp = steps(model, blocks, args.warmup + args.steps, dtype)[args.warmup:]
    report.update(fp_step_s=statistics.median(fp), fp_peak_rss_gb=mem.peak / 1e9)

    model, _ = load_model("smollm2-135m", with_tokenizer=False)
    layers = qaft.prepare(model, args.spec, qaft.QAFTConfig(scale_mode=args.scale_mode))
    with PeakRSS() as mem:
        fq = steps(model, blocks, args.warmup + args.steps, dtype)[args.warmup:]
    report.update(fake_quant_step_s=statistics.median(fq), fake_quant_peak_rss_gb=mem.peak / 1e9)
    report["ratio"] = report["fake_quant_step_s"] / report["fp_step_s"]

    t0 = time.perf_counter()  # the fake quantization alone, forward and STE backward
    for _ in range(3):
        for layer in layers.values():
            w_hat = layer.quantized_weight()
            w_hat.backward(torch.ones_like(w_hat))
    report["fake_quant_alone_s"] = (time.perf_counter() - t0) / 3
    params = [p for p in model.parameters() if p.requires_grad]
    report.update(optimizer_step_fused_s=optimizer_step(params, fused_adam(params)),
                  optimizer_step_default_s=optimizer_step(params, None))
    print(json.dumps(report, indent=1))
    if args.json:
        from compare.io import write_json
        write_json(args.json, report)


if __name__ == "__main__":
    main()
