"""`qalign fp-law`: paper C's law for one configuration, from the command line.

    qalign fp-law --bits 8 --params 1e9 --block 128          # names E4M3, D_crit about 27T
    qalign fp-law --format e2m1 --params 7e9 --tokens 2e12 --block 32
"""

from __future__ import annotations

import argparse
import json

from compare.fp_law import PUBLISHED, best_layout, critical_data, predict
from ptq.errors import OptionsError
from ptq.formats import parse_spec

__all__ = ["add_law_flags", "cmd_fp_law", "law_table"]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; write e.g. 1e9") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive finite number")
    return value


def add_law_flags(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--bits", type=int, help="total bits of the format (sign + E + M): the "
                                               "law picks the best exponent/mantissa split")
    what.add_argument("--format", help="a floating-point format e{E}m{M} (or fp4, fp8, bf16)")
    p.add_argument("--params", type=_positive, required=True, help="model parameters N, e.g. 1e9")
    p.add_argument("--tokens", type=_positive,
                   help="training tokens D (default: the critical data size D_crit)")
    p.add_argument("--block", type=_positive, default=128,
                   help="block size B of the scaling factors (default: 128)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _tokens(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if x >= size:
            return f"{x / size:,.1f}{unit}"
    return f"{x:,.0f}"


def law_table(bits: int | None, fmt: str | None, N: float, D: float | None, B: float) -> dict:
    if fmt is not None:
        spec = parse_spec(fmt)
        if spec.kind != "float":
            raise OptionsError(f"--format {fmt}: the law is about floating-point formats; give "
                               "e{E}m{M}, fp4, fp8 or bf16")
        E, M, bits = spec.exp_bits, spec.man_bits, spec.bits
    else:
        E, M = best_layout(bits)
    d_crit = critical_data(N, E, M, B)
    D = d_crit if D is None else D
    layouts = sorted(((float(predict(N, D, e, bits - 1 - e, B)), e, bits - 1 - e)
                      for e in range(1, bits)))
    return {"bits": bits, "E": E, "M": M, "format": f"E{E}M{M}", "N": N, "D": D, "B": B,
            "loss": float(predict(N, D, E, M, B)), "D_crit": d_crit,
            "best_layout": f"E{layouts[0][1]}M{layouts[0][2]}",
            "layouts": [{"format": f"E{e}M{m}", "loss": loss} for loss, e, m in layouts],
            "constants": "published (Sun et al. 2025, arXiv 2501.02423)"}


def cmd_fp_law(args) -> None:
    if args.bits is not None and args.bits < 3:
        raise OptionsError(f"--bits {args.bits}: a floating-point format has a sign, an "
                           "exponent and a mantissa; give 3 or more")
    r = law_table(args.bits, args.format, args.params, args.tokens, args.block)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    chosen = "given" if args.format else f"the lowest-loss {r['bits']}-bit layout"
    print(f"format       {r['format']} ({chosen}: 1 sign + {r['E']} exponent + {r['M']} "
          "mantissa bits)")
    print(f"model        N = {r['N']:.3g} parameters, scaling blocks of B = {r['B']:g}")
    print(f"D_crit       {_tokens(r['D_crit'])} tokens ({r['D_crit']:.3g}): training on more "
          "raises the loss in this format")
    at = "D_crit" if args.tokens is None else f"D = {_tokens(r['D'])} tokens"
    print(f"loss         {r['loss']:.4f} predicted at {at}")
    print(f"{r['bits']}-bit layouts at that D: " + ", ".join(
        f"{x['format']} {x['loss']:.4f}" for x in r["layouts"][:4]))
    print(f"constants    {r['constants']}: n={PUBLISHED.n} a={PUBLISHED.a} d={PUBLISHED.d} "
          f"b={PUBLISHED.b} eps={PUBLISHED.eps} g={PUBLISHED.g} dl={PUBLISHED.dl} "
          f"nu={PUBLISHED.nu}")
