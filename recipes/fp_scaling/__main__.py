"""`python -m recipes.fp_scaling`: the same as `qalign recipe fp-scaling`."""

from .recipe import main

main()
