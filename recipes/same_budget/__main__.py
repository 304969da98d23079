"""`python -m recipes.same_budget`: the same as `qalign recipe same-budget`."""

from .recipe import main

main()
