"""Command-line wiring of PTQ: method selection, options and the calibration budget.

Every field of every registered method's options dataclass becomes a flag (`--block-size`,
`--act-order`, ...), with the field's metadata["help"]; a flag that the chosen method does not
have is an error. Methods that need a Hessian get a `DataBudget` of `--samples x --seq-len`
tokens from the train split of `--data`, and go through the block-by-block driver.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from compare.data import DataBudget, load_text, tokenize
from ptq.apply import quantize_model
from ptq.formats import parse_spec
from ptq.registry import METHODS, get_method
from ptq.sequential import quantize_sequential

__all__ = ["add_field_flag", "dataclass_from_args", "add_method_args", "add_budget_args", "options_for", "method_options", "run_ptq",
           "layer_table"]

_TYPES = {"int": int, "float": float, "str": str}


def _option_fields() -> dict[str, dataclasses.Field]:
    fields = {}
    for method in METHODS.values():
        for f in dataclasses.fields(method.options):
            fields.setdefault(f.name, f)
    return fields


def add_field_flag(p: argparse.ArgumentParser, f: dataclasses.Field, owners: str = "") -> None:
    """One flag for one dataclass field: --field-name, help from metadata["help"], not set unless
    given (so the dataclass keeps its own default); bools get --x / --no-x."""
    flag = "--" + f.name.replace("_", "-")
    text = f"{f.metadata.get('help', f.name)} ({owners + '; ' if owners else ''}default {f.default})"
    if f.type in ("bool", bool):
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help=text)
    else:
        p.add_argument(flag, type=_TYPES.get(f.type, str), default=argparse.SUPPRESS, help=text)


def dataclass_from_args(cls, args, **overrides):
    """An instance of cls from the flags that add_field_flag made and the user gave."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})


def add_method_args(p: argparse.ArgumentParser, spec_required: bool,
                    with_method: bool = True) -> None:
    """--spec, --method and one flag per field of every registered method's options."""
    if with_method:
        p.add_argument("--spec", required=spec_required,
                       help="quantization spec, e.g. int3-g64, int4-sym-ch, e2m1-g32")
        p.add_argument("--method", default="rtn",
                       help=f"registered PTQ method (default: rtn; have: "
                            f"{', '.join(sorted(METHODS))})")
    for name, f in _option_fields().items():
        owners = [m.name for m in METHODS.values()
                  if name in {x.name for x in dataclasses.fields(m.options)}]
        add_field_flag(p, f, ", ".join(owners))


def add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=128,
                   help="calibration budget: number of token blocks (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default: 0)")
    p.add_argument("--true-sequential", action="store_true",
                   help="calibrate each group of layers after the earlier groups are quantized")
    p.add_argument("--propagate", choices=["quantized", "fp"], default="quantized",
                   help="feed each block the quantized (default) or FP previous block's outputs")
    p.add_argument("--calib-batch-size", type=int, default=8,
                   help="calibration blocks per forward pass (default: 8)")


def options_for(method_name: str, args, among: list[str] | None = None):
    """Options of one method from the flags given. A flag that none of the methods in `among`
    (default: just this one) has is an error; flags of the other methods are left to them."""
    method = get_method(method_name)
    own = {f.name for f in dataclasses.fields(method.options)}
    among = among or [method_name]
    known = {f.name for m in among for f in dataclasses.fields(get_method(m).options)}
    given = {name: getattr(args, name) for name in _option_fields() if hasattr(args, name)}
    foreign = sorted(set(given) - known)
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        raise SystemExit(f"{flags}: not an option of method(s) {', '.join(among)} "
                         f"(their options: {sorted(known) or 'none'})")
    return method.make_options(**{k: v for k, v in given.items() if k in own})


def method_options(args):
    return options_for(args.method, args)


def run_ptq(model, tokenizer, args, progress: bool = True, text=None) -> dict:
    """Quantize `model` in place as the flags say; return the report (rows, budget, seconds).
    `text`: the already loaded TextSplits of args.data, if the caller has them."""
    spec = parse_spec(args.spec)
    method = get_method(args.method)
    options = method_options(args)
    t0 = time.perf_counter()
    if not (method.needs_hessian or method.needs_inputs):
        res = quantize_model(model, spec, args.method, options, progress=progress,
                             keep_codes=True)
        rows = [dataclasses.asdict(r) for r in res.layers]
        return {"method": args.method, "spec": str(spec), "options": dataclasses.asdict(options),
                "budget": None, "seconds": time.perf_counter() - t0, "layers": rows,
                "_quantized": res.quantized}
    budget = DataBudget(args.samples, args.seq_len, args.seed)
    text = text if text is not None else load_text(args.data)
    calib = budget.blocks(tokenize(tokenizer, text.train))
    res = quantize_sequential(model, calib, spec, args.method, options,
                              true_sequential=args.true_sequential, propagate=args.propagate,
                              batch_size=args.calib_batch_size, progress=progress)
    return {"method": args.method, "spec": str(spec), "options": dataclasses.asdict(options),
            "budget": {"data": args.data, "n_samples": budget.n_samples,
                       "seq_len": budget.seq_len, "seed": budget.seed,
                       "unique_tokens": budget.unique_tokens,
                       "true_sequential": args.true_sequential, "propagate": args.propagate},
            "seconds": time.perf_counter() - t0, "layers": [r.to_dict() for r in res.rows],
            "_quantized": res.quantized}


def layer_table(rows: list[dict]) -> str:
    """Fixed-width per-layer table for the terminal."""
    if not rows or "rel_output_error" not in rows[0]:
        return "\n".join(f"{r['name']:48s} {str(tuple(r['shape'])):>12s} "
                         f"weight err {r['weight_rel_error']:.3e}" for r in rows)
    lines = [f"{'layer':48s} {'shape':>12s} {'damp':>7s} {'proxy loss':>11s} "
             f"{'rel out err':>11s} {'s':>6s}"]
    for r in rows:
        damp = "-" if r["damp"] is None else f"{r['damp']:.3g}"
        lines.append(f"{r['name']:48s} {str(tuple(r['shape'])):>12s} {damp:>7s} "
                     f"{r['proxy_loss']:11.4e} {r['rel_output_error']:11.4e} {r['seconds']:6.2f}")
    return "\n".join(lines)
