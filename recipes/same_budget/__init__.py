"""Recipe: FP, RTN, GPTQ and QAFT on one data budget, with the FP fine-tuning control.

    qalign recipe same-budget --help

Files: recipe.py (flags, run, table and plot).
"""

from .recipe import build_parser, main, run

__all__ = ["build_parser", "run", "main"]
