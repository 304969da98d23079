"""Recipe: floating-point quantized training and its scaling law at CPU scale (paper C).

    qalign recipe fp-scaling --help

Files: recipe.py (config, presets, plan, run, the law's fit), report.py (report.md and plots).
"""

from .recipe import (PRESETS, FPScalingConfig, build_parser, config_from_args, main, plan, run,
                     run_recipe)

__all__ = ["FPScalingConfig", "PRESETS", "plan", "run_recipe", "build_parser", "config_from_args",
           "run", "main"]
