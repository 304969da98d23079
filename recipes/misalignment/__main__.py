"""`python -m recipes.misalignment`: the same as `qalign recipe misalignment`."""

from .recipe import main

main()
