"""Recipe: held-out perplexity in full precision and after each PTQ method at several specs.

    qalign recipe ptq-table --help

Files: recipe.py (flags, run, table and plot).
"""

from .recipe import build_parser, main, run

__all__ = ["build_parser", "run", "main"]
