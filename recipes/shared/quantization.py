"""Command-line wiring of PTQ: method selection, each method's options, the calibration budget.

Every registered method's options dataclass becomes a group of flags in the method's own
namespace (`--gptq-damp`, `--gptq-act-order`, `--rtn-clip-search`, ...; recipes.shared.flags); a
flag of a method that is not selected is an error. Methods that calibrate get a `DataBudget` of
`--samples x --seq-len` tokens from the train split of `--data` and `ptq.quantize_model` runs
them block by block; the budget flags are refused for a data-free method.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from compare.data import DataBudget, TextSplits, bos_token_id, budget_blocks
from ptq import PTQResult, quantize_model
from ptq.errors import OptionsError
from ptq.formats import QuantSpec
from ptq.registry import available_methods, get_method
from recipes.shared.flags import add_dataclass_flags, flag_name, from_args, given_fields

__all__ = ["DEFAULT_SEQ_LEN", "CalibConfig", "add_method_flags", "add_calib_flags",
           "method_options", "calib_config", "run_ptq", "layer_table"]

DEFAULT_SEQ_LEN = 512  # tokens per block or window, unless the model has fewer positions


@dataclass(frozen=True)
class CalibConfig:
    """The calibration budget and how the block-by-block driver uses it."""

    samples: int = field(default=128, metadata={
        "help": "calibration budget: number of token blocks"})
    seq_len: int = field(default=DEFAULT_SEQ_LEN, metadata={
        "help": "calibration block length in tokens"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration draw"})
    true_sequential: bool = field(default=False, metadata={
        "help": "calibrate each group of layers after the earlier groups are quantized"})
    propagate: str = field(default="quantized", metadata={
        "help": "feed each block the quantized or the FP previous block's outputs"})
    calib_batch_size: int = field(default=8, metadata={"help": "calibration blocks per forward"})

    def __post_init__(self):
        for name, low in (("samples", 1), ("seq_len", 2), ("calib_batch_size", 1)):
            if getattr(self, name) < low:
                raise OptionsError(f"{flag_name(name)} {getattr(self, name)}: give {low} or more")
        if self.propagate not in ("quantized", "fp"):
            raise OptionsError(f"--propagate {self.propagate}: use quantized or fp")

    @property
    def budget(self) -> DataBudget:
        return DataBudget(self.samples, self.seq_len, self.seed)


def add_method_flags(p: argparse.ArgumentParser, *, with_method: bool = True,
                     spec_required: bool = False) -> None:
    """--spec and --method (unless with_method is False), and one group of flags per registered
    method, in that method's namespace."""
    if with_method:
        p.add_argument("--spec", required=spec_required,
                       help="quantization spec, e.g. int3-g64, int4-sym-ch, e2m1-g32")
        p.add_argument("--method", default="rtn",
                       help=f"registered PTQ method (default: rtn; have: "
                            f"{', '.join(sorted(available_methods()))}; `qalign methods` "
                            "lists them)")
    for name, method in sorted(available_methods().items()):
        if dataclasses.fields(method.options):
            group = p.add_argument_group(f"options of method {name}")
            add_dataclass_flags(group, method.options, prefix=name)


def add_calib_flags(p, exclude=()) -> None:
    group = p.add_argument_group("calibration (methods that calibrate)")
    add_dataclass_flags(group, CalibConfig, exclude=exclude)


def method_options(args, chosen: list[str]) -> dict:
    """{method: options} for the chosen methods from their flags; a flag of any other
    registered method is an error naming the methods it belongs to."""
    for m in chosen:
        get_method(m)  # unknown names fail here
    for name, method in available_methods().items():
        given = given_fields(method.options, args, prefix=name)
        if given and name not in chosen:
            flags = ", ".join(flag_name(k, name) for k in given)
            raise OptionsError(f"{flags}: option(s) of method {name}, which this run does not "
                               f"use (methods: {', '.join(chosen)})")
    return {m: from_args(get_method(m).options, args, prefix=m) for m in chosen}


def calib_config(args, method: str, **overrides) -> CalibConfig | None:
    """The calibration config for `method`, or None for a data-free method; calibration flags
    given to a data-free method are an error (they would be silently ignored). `overrides` come
    from the command's own flags (eval's --seq-len is also the calibration block length)."""
    given = {k: v for k, v in given_fields(CalibConfig, args).items() if k not in overrides}
    if not get_method(method).needs_data:
        if given:
            flags = ", ".join(flag_name(k) for k in given)
            raise OptionsError(f"{flags}: method {method} needs no calibration data; leave "
                               "the flag(s) out or use a method that calibrates (gptq)")
        return None
    return CalibConfig(**{**given, **overrides})


def run_ptq(model, tokenizer, text: TextSplits, spec: QuantSpec, method: str, options,
            calib: CalibConfig | None, *, add_bos: bool | None = None,
            progress: bool = True) -> tuple[PTQResult, dict | None]:
    """Quantize `model` in place; returns the result and the budget record (None without data)."""
    if calib is None:
        return quantize_model(model, spec, method, options, progress=progress), None
    budget = calib.budget
    blocks = budget_blocks(tokenizer, text, budget, add_bos)
    res = quantize_model(model, spec, method, options, calib=blocks,
                         true_sequential=calib.true_sequential, propagate=calib.propagate,
                         batch_size=calib.calib_batch_size, progress=progress)
    record = {"data": text.name, **dataclasses.asdict(budget),
              "unique_tokens": budget.unique_tokens, "true_sequential": calib.true_sequential,
              "propagate": calib.propagate,
              "bos": bos_token_id(tokenizer, add_bos) is not None}
    return res, record


def layer_table(rows: list[dict]) -> str:
    """Fixed-width per-layer table for the terminal."""
    lines = [f"{'layer':48s} {'shape':>12s} {'damp':>7s} {'weight err':>11s} {'proxy loss':>11s} "
             f"{'rel out err':>11s} {'s':>6s}"]

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in rows:
        lines.append(f"{r['name']:48s} {str(tuple(r['shape'])):>12s} {num(r['damp'], '7.3g')} "
                     f"{r['weight_rel_error']:11.4e} {num(r['proxy_loss'], '11.4e')} "
                     f"{num(r['rel_output_error'], '11.4e')} {r['seconds']:6.2f}")
    return "\n".join(lines)
