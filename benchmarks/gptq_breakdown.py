"""Where a GPTQ run on SmolLM2-135M spends time and memory, measured piece by piece.

    python -m benchmarks.gptq_breakdown --samples 128 --seq-len 512 [--dtype bfloat16] \
        [--default-allocator]

Reports the process RSS after loading the model and after tokenizing the train split, the time
of one decoder block's forward pass over the whole calibration budget (and the GFLOP/s of its
linear layers), the time of that block's Hessians (X^T X of each input group over every batch,
as `ptq.hessian.gram` takes it and as a plain float32 GEMM of the upcast inputs), this machine's
GEMM rate in the model's dtype, and the implied totals over all blocks. glibc's allocator is
tuned first, as the `qalign` command does (`ptq.allocator`), unless --default-allocator.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.gptq_core import rate
from compare.data import DataBudget, load_text, tokenize
from compare.dtypes import resolve_dtype
from compare.memory import current_rss
from compare.models import load_model
from ptq.layers import linear_weight, quantizable_linears
from ptq.allocator import tune_allocator
from ptq.arch import decoder_blocks
from ptq.hessian import gram
from ptq.sequential import _input_groups, _run_block, capture_block_inputs


def _best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _hessian_seconds(block, layers: dict, inputs, kwargs) -> dict:
    """Seconds of X^T X for the block's input groups over all batches, both ways."""
    groups = _input_groups(block, layers, inputs, kwargs)
    xs = {g[0]: [] for g in groups}
    handles = [layers[g[0]].register_forward_hook(
        lambda mod, args, out, name=g[0]: xs[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for g in groups]
    with torch.no_grad():
        _run_block(block, inputs, kwargs)
    for h in handles:
        h.remove()
    batches = [x for group in xs.values() for x in group]

    def plain():  # what HessianAccumulator did before gram: upcast once, float32 GEMM
        for x in batches:
            xf = x.float()
            xf.T @ xf

    def ours():
        for x in batches:
            gram(x)

    return {"hessian_gram_s": _best_of(ours), "hessian_plain_fp32_s": _best_of(plain),
            "input_groups": [len(g) for g in groups]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=128, help="calibration blocks (default: 128)")
    p.add_argument("--seq-len", type=int, default=512, help="block length (default: 512)")
    p.add_argument("--dtype", default="float32",
                   help="model dtype: float32, bfloat16 or auto (default: float32)")
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's malloc settings (default: tuned as the qalign command "
                        "tunes them)")
    args = p.parse_args()
    tuned = not args.default_allocator and tune_allocator()
    dtype = resolve_dtype(args.dtype, "cpu")

    report = {"allocator": "tuned" if tuned else "default", "rss_start_gb": current_rss() / 1e9}
    model, tok = load_model("smollm2-135m", dtype=dtype)
    report["rss_model_loaded_gb"] = current_rss() / 1e9
    train = tokenize(tok, load_text("wiki").train)
    report["rss_train_tokenized_gb"] = current_rss() / 1e9
    calib = DataBudget(args.samples, args.seq_len).blocks(train)
    captured = capture_block_inputs(model, calib, 8, torch.device("cpu"))
    inputs, kwargs = captured.hidden, captured.kwargs(0)
    block = decoder_blocks(model)[0]
    with torch.no_grad():
        _run_block(block, inputs[:1], kwargs[:1])  # warm up
        t0 = time.perf_counter()
        _run_block(block, inputs, kwargs)
        seconds = time.perf_counter() - t0
    own = {n: m for n, m in quantizable_linears(model) if n.startswith("model.layers.0.")}
    params = sum(linear_weight(m).numel() for m in own.values())
    n_blocks = len(decoder_blocks(model))
    hess = _hessian_seconds(block, own, inputs, kwargs)
    report.update(
        dtype=str(dtype), tokens=calib.numel(), block_pass_s=seconds,
        block_linear_gflops=2 * params * calib.numel() / seconds / 1e9,
        gemm_gflops=rate(dtype, 2048) / 1e9,
        two_passes_all_blocks_s=2 * n_blocks * seconds, **hess,
        hessians_all_blocks_s=n_blocks * hess["hessian_gram_s"],
        hessians_plain_fp32_all_blocks_s=n_blocks * hess["hessian_plain_fp32_s"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
