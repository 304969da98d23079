"""Speed of the GPTQ core on one large layer against this machine's own matmul throughput.

    python benchmarks/gptq_core.py --rows 4096 --cols 4096 --spec int4-g128

FLOP count of gptq_quantize on W (r x n), per the algorithm (Frantar et al. 2022):
  factorization (float64): Cholesky of H, inverse from it, Cholesky of the inverse, about
      n^3/3 + 2n^3/3 + n^3/3 = 4n^3/3 multiply-adds x 2 = 8n^3/3 FLOP;
  lazy block updates (float32): 2 r n^2 / 2 ... summed over blocks = r n (n - B) FLOP x 2 / 2;
  in-block column updates: about r n B FLOP.
The machine's throughput is measured in the same run: a float32 n x n GEMM and a float64 one.
"Allowed" time = factorization FLOP / fp64 rate + update FLOP / fp32 rate; the report gives
the fraction of that achieved and where the time goes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ptq.gptq import gptq_quantize, inverse_cholesky


def rate(dtype: torch.dtype, n: int, repeat: int = 3) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="out_features (default: 4096)")
    p.add_argument("--cols", type=int, default=4096, help="in_features (default: 4096)")
    p.add_argument("--spec", default="int4-g128", help="spec (default: int4-g128)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ block size (default: 128)")
    p.add_argument("--act-order", action="store_true", help="use act_order")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r, n, B = args.rows, args.cols, args.block_size
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * n, n // 8, generator=g) @ torch.randn(n // 8, n, generator=g)
    X += 0.1 * torch.randn(2 * n, n, generator=g)
    H = (2.0 / X.shape[0]) * (X.T @ X).double()
    W = torch.randn(r, n, generator=g) * 0.02

    fp32, fp64 = rate(torch.float32, n), rate(torch.float64, n)
    t0 = time.perf_counter()
    inverse_cholesky(H, 0.01)
    t_fact = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = gptq_quantize(W, H, args.spec, block_size=B, act_order=args.act_order)
    t_all = time.perf_counter() - t0

    fact_flop = 8 * n**3 / 3
    update_flop = r * n * (n - B) + r * n * B
    allowed = fact_flop / fp64 + update_flop / fp32
    report = {
        "shape": [r, n], "spec": args.spec, "block_size": B, "act_order": args.act_order,
        "threads": torch.get_num_threads(),
        "fp32_gemm_gflops": fp32 / 1e9, "fp64_gemm_gflops": fp64 / 1e9,
        "gptq_seconds": t_all, "factorization_seconds": t_fact,
        "column_loop_and_updates_seconds": t_all - t_fact,
        "flop_allowed_seconds": allowed, "fraction_of_allowed": allowed / t_all,
        "loss": res.loss,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        from compare.io import write_json
        write_json(args.json, report)


if __name__ == "__main__":
    main()
