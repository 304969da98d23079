"""`qalign eval`: held-out NLL and perplexity of a model as loaded, or quantized on the fly with
--spec and --method."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from compare.data import load_text
from compare.evaluate import evaluate_nll, heldout_windows
from compare.io import read_json, write_json
from compare.models import load_model
from ptq.errors import OptionsError
from ptq.formats import parse_spec
from recipes.commands.args import DEFAULT_SEQ_LEN, compute_dtype, seq_len_for
from recipes.shared.common import out_file, resolve_device
from recipes.shared.flags import given_fields
from recipes.shared.quantization import CalibConfig, calib_config, method_options, run_ptq

__all__ = ["cmd_eval"]


def _source_label(model: str) -> dict:
    """What a --model folder holds, from the report qalign wrote next to it (else FP)."""
    for name in ("qalign-quant.json", "qalign-finetune.json"):
        report = read_json(Path(model) / name) if Path(model).is_dir() else None
        if report is not None:
            method = report.get("method") or report.get("mode")
            return {"method": method, "spec": report.get("spec")}
    return {"method": "fp", "spec": None}


def cmd_eval(args) -> None:
    spec = parse_spec(args.spec) if args.spec else None
    if spec is None:  # the model is evaluated as loaded: method and calibration flags are moot
        method_options(args, [])
        if args.method != "rtn" or set(given_fields(CalibConfig, args)) - {"seq_len"}:
            raise OptionsError("--method and calibration flags need --spec (without it the "
                               "model is evaluated as loaded)")
        options = calib = None
    else:
        options = method_options(args, [args.method])[args.method]
        calib = calib_config(args, args.method, seq_len=args.seq_len or DEFAULT_SEQ_LEN)
    if args.json:
        out_file(args.json, "--json")
    device = resolve_device(args.device)
    dtype = compute_dtype(args)
    text = load_text(args.data)  # once: calibration (train split) and evaluation (held-out)
    model, tokenizer = load_model(args.model, device=device, dtype=dtype,
                                  trust_remote_code=args.trust_remote_code)
    seq_len = seq_len_for(model, args.seq_len)
    if calib is not None:
        calib = dataclasses.replace(calib, seq_len=seq_len)
    label = _source_label(args.model)
    if spec is not None:
        res, _ = run_ptq(model, tokenizer, text, spec, args.method, options, calib,
                         add_bos=args.add_bos)
        label = {"method": args.method if label["method"] == "fp"
                 else f"{label['method']}+{args.method}", "spec": str(spec)}
        print(f"{args.method} {spec}: {len(res.layers)} layers in {res.seconds:.1f} s")
    windows, bos_id = heldout_windows(tokenizer, text, seq_len, args.max_tokens,
                                      args.add_bos)
    result = evaluate_nll(model, windows, batch_size=args.batch_size, bos_id=bos_id)
    row = {"model": args.model, "data": args.data, **label, "dtype": str(dtype).split(".")[-1],
           **result.to_dict()}
    print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}, indent=1))
    if args.json:
        write_json(args.json, row)
