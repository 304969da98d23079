"""Runnable experiments (one folder per recipe: misalignment, ptq_table, same_budget,
training_dynamics, optimizer_choices, fp_scaling), the pieces they share (`recipes.shared`), the
`qalign` subcommands (`recipes.commands`) and the command line itself (`recipes.cli`)."""
