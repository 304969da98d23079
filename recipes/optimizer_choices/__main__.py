"""`python -m recipes.optimizer_choices`: the same as `qalign recipe optimizer-choices`."""

from .recipe import main

main()
