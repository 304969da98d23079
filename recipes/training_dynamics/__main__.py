"""`python -m recipes.training_dynamics`: the same as `qalign recipe training-dynamics`."""

from .recipe import main

main()
