"""Recipe: does the global loss follow the local loss? RTN, GPTQ and QAFT on one budget.

    qalign recipe misalignment --help

Files: recipe.py (flags, run, resume), config.py (MisalignmentConfig, presets, YAML), study.py
(plan and shared state), measure.py (solve, tune, measure), report.py and plots.py (report.md,
results.json, the plots).
"""

from .config import PRESETS, MisalignmentConfig, load_config
from .recipe import build_parser, config_from_args, main, run, run_study

__all__ = ["MisalignmentConfig", "PRESETS", "load_config", "build_parser", "config_from_args",
           "run", "run_study", "main"]
