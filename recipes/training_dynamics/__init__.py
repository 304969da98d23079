"""Recipe: how the learning-rate schedule shapes PTQ robustness along training (paper A).

    qalign recipe training-dynamics --help

Files: recipe.py (config, presets, plan, run), report.py (report.md and plots).
"""

from .recipe import (PRESETS, DynamicsConfig, build_parser, config_from_args, main, plan, run,
                     run_recipe)

__all__ = ["DynamicsConfig", "PRESETS", "plan", "run_recipe", "build_parser", "config_from_args",
           "run", "main"]
