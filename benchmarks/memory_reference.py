"""Where the main job's first gigabytes go: RSS after loading the model, after the held-out
windows, and around the FP reference log-probabilities that KL(FP || Q) needs.

    python -m benchmarks.memory_reference [--default-allocator] [--tokens 8192]

Prints VmRSS and VmHWM (the process's peak) after each step, read from /proc/self/status (Linux).
The reference is 4 bytes x tokens x vocabulary (1.61 GB for 8,192 SmolLM2 tokens); computing it
with `torch.cat` of the per-batch pieces briefly holds it twice, and with `ptq.allocator`'s tuned
glibc (what the `qalign` command runs with) the freed half stays resident.
"""

from __future__ import annotations

import argparse

import torch

from ptq.allocator import tune_allocator


def memory() -> str:
    """VmRSS and VmHWM of this process in GB."""
    kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in
                                             open("/proc/self/status"))
          if k in ("VmRSS", "VmHWM")}
    return f"RSS {kb['VmRSS'] / 1e6:.2f} GB, peak {kb['VmHWM'] / 1e6:.2f} GB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's default malloc settings (the qalign command tunes them)")
    p.add_argument("--tokens", type=int, default=8192,
                   help="held-out tokens of the reference, as the quick job (default: 8192)")
    args = p.parse_args()
    if not args.default_allocator:
        tune_allocator()
    from compare import load_model, load_text
    from compare.evaluate import heldout_windows, reference_logprobs

    print(f"start: {memory()}")
    model, tok = load_model("smollm2-135m", dtype=torch.bfloat16)
    print(f"model loaded (bfloat16): {memory()}")
    windows, _ = heldout_windows(tok, load_text("wiki"), 512, args.tokens)
    print(f"text and windows: {memory()}")
    with torch.no_grad():
        ref = reference_logprobs(model, windows, progress=False)
    print(f"FP reference ({ref.numel() * 4 / 1e9:.2f} GB of float32): {memory()}")
    del ref
    print(f"reference freed: {memory()}")


if __name__ == "__main__":
    main()
