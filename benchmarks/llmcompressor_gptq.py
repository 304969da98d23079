"""llm-compressor's GPTQ on the same model, tokens and spec as qalign, for side-by-side timing.

Runs in its own virtual environment (llmcompressor pins its own transformers); needs only torch,
transformers, datasets, safetensors and llmcompressor. Called by benchmarks/gptq_smollm2.py:

    /path/to/lc-venv/bin/python benchmarks/llmcompressor_gptq.py --model DIR --tokens FILE \
        --bits 3 --group-size 64 [--sym] [--dtype bfloat16]

Prints one JSON line: quantize seconds, whole-process wall and peak RSS, held-out NLL/perplexity
(mean of transformers' labels= loss over the same windows qalign scores).
"""

import argparse
import json
import math
import resource
import time

T_START = time.perf_counter()

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder (fp32 safetensors)")
    p.add_argument("--tokens", required=True, help="safetensors with 'calib' and 'eval' id tensors")
    p.add_argument("--bits", type=int, default=3, help="weight bits (default: 3)")
    p.add_argument("--group-size", type=int, default=64, help="group size (default: 64)")
    p.add_argument("--sym", action="store_true", help="symmetric grid")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's dtype (default: float32)")
    args = p.parse_args()

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    tokens = load_file(args.tokens)
    calib, windows = tokens["calib"], tokens["eval"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    ds = Dataset.from_dict({"input_ids": calib.tolist(),
                            "attention_mask": torch.ones_like(calib).tolist()})
    scheme = {"targets": ["Linear"],
              "weights": {"num_bits": args.bits, "type": "int", "symmetric": args.sym,
                          "strategy": "group", "group_size": args.group_size}}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1])
    quantize_seconds = time.perf_counter() - t0

    model.eval()
    losses = []
    with torch.no_grad():
        for w in windows:
            losses.append(float(model(input_ids=w[None], labels=w[None]).loss))
    nll = sum(losses) / len(losses)
    print(json.dumps({"library": "llm-compressor", "dtype": args.dtype,
                      "quantize_seconds": quantize_seconds,
                      "nll": nll, "perplexity": math.exp(nll),
                      "wall_seconds": time.perf_counter() - T_START,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
