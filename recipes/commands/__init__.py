"""What each `qalign` subcommand does (prepare, quantize, eval, finetune, methods, pretrain,
fp-law); `recipes.cli` builds the parser and dispatches here. Recipes live in their own folders."""
