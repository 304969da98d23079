"""`python -m recipes.ptq_table`: the same as `qalign recipe ptq-table`."""

from .recipe import main

main()
