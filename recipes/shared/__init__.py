"""What the recipes and the `qalign` commands share: flags from dataclasses (`flags`), output
folders, devices, versions and one-line errors (`common`), matched tuning (`tuning`), the PTQ
run and its flags (`quantization`), small-model pretraining (`pretraining`) and the training
recipes' common machinery (`training`). Nothing here imports a recipe or the CLI."""
