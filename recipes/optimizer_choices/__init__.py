"""Recipe: how optimization choices shape PTQ robustness and outlier features (paper D).

    qalign recipe optimizer-choices --help

Files: recipe.py (config, presets, plan, run), report.py (report.md and plots).
"""

from .recipe import (PRESETS, ChoicesConfig, build_parser, config_from_args, main, plan, run,
                     run_recipe)

__all__ = ["ChoicesConfig", "PRESETS", "plan", "run_recipe", "build_parser", "config_from_args",
           "run", "main"]
