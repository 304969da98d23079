"""`qalign quantize`: quantize every linear layer of the decoder blocks with a registered method
and save the model (qalign's packed checkpoint or a compressed-tensors export) with its report."""

from __future__ import annotations

import dataclasses

from compare.data import load_text
from compare.io import write_csv, write_json
from compare.models import load_model
from ptq.checkpoint import save_quantized
from ptq.errors import OptionsError
from ptq.export import check_compressed_tensors_spec, save_compressed_tensors
from ptq.formats import parse_spec
from recipes.commands.args import compute_dtype, seq_len_for
from recipes.shared.common import out_folder, resolve_device, versions
from recipes.shared.flags import given_fields
from recipes.shared.quantization import (CalibConfig, calib_config, layer_table, method_options,
                                         run_ptq)

__all__ = ["cmd_quantize"]


def cmd_quantize(args) -> None:
    spec = parse_spec(args.spec)
    options = method_options(args, [args.method])[args.method]
    calib = calib_config(args, args.method)
    out = out_folder(args.out)
    dtype = compute_dtype(args)
    if args.export == "compressed-tensors":  # refuse what the format cannot hold before work
        check_compressed_tensors_spec(spec)
        if out.exists():
            raise OptionsError(f"--out {out} exists; an export writes a new folder: choose "
                               "another path")
    device = resolve_device(args.device)
    text = load_text(args.data) if calib is not None else None
    model, tokenizer = load_model(args.model, device=device, dtype=dtype,
                                  trust_remote_code=args.trust_remote_code)
    if calib is not None:  # a default block length longer than the model's context is capped
        given = given_fields(CalibConfig, args).get("seq_len")
        calib = dataclasses.replace(calib, seq_len=seq_len_for(model, given))
    res, budget = run_ptq(model, tokenizer, text, spec, args.method, options, calib,
                          add_bos=args.add_bos)
    if args.export == "compressed-tensors":
        save_compressed_tensors(model, res.quantized, out, tokenizer=tokenizer)
    else:
        save_quantized(model, res.quantized, out, {"method": args.method,
                                                   "source_model": args.model})
        tokenizer.save_pretrained(out)
    report = {"source_model": args.model, **res.to_dict(), "budget": budget,
              "versions": versions()}
    write_json(out / "qalign-quant.json", report)
    write_csv(out / "layers.csv", report["layers"])
    print(layer_table(report["layers"]))
    print(f"{args.method} {spec}: {len(res.layers)} layers in {res.seconds:.1f} s -> {out}")
