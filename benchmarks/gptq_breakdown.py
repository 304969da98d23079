"""Where a GPTQ run on SmolLM2-135M spends time and memory, measured piece by piece.

    python -m benchmarks.gptq_breakdown --samples 128 --seq-len 512 [--dtype bfloat16]

Reports the process RSS after loading the model and after tokenizing the train split, the time
of one decoder block's forward pass over the whole calibration budget (and the GFLOP/s of its
linear layers), this machine's GEMM rate in the model's dtype, and the implied time of the
driver's two passes per block over all blocks.
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
from ptq.arch import decoder_blocks
from ptq.sequential import _run_block, capture_block_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=128, help="calibration blocks (default: 128)")
    p.add_argument("--seq-len", type=int, default=512, help="block length (default: 512)")
    p.add_argument("--dtype", default="float32",
                   help="model dtype: float32, bfloat16 or auto (default: float32)")
    args = p.parse_args()
    dtype = resolve_dtype(args.dtype, "cpu")

    report = {"rss_start_gb": current_rss() / 1e9}
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
    params = sum(linear_weight(m).numel() for n, m in quantizable_linears(model)
                 if n.startswith("model.layers.0."))
    n_blocks = len(decoder_blocks(model))
    report.update(
        dtype=str(dtype), tokens=calib.numel(), block_pass_s=seconds,
        block_linear_gflops=2 * params * calib.numel() / seconds / 1e9,
        gemm_gflops=rate(dtype, 2048) / 1e9,
        two_passes_all_blocks_s=2 * n_blocks * seconds)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
