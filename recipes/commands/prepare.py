"""`qalign prepare`: convert the embedded model once (GGUF -> fp32 safetensors in the cache) and
load the embedded text, so later commands start in about a second."""

from __future__ import annotations

from compare.data import load_text
from compare.models import EMBEDDED_MODELS, prepare_embedded

__all__ = ["cmd_prepare"]


def cmd_prepare(args) -> None:
    names = list(EMBEDDED_MODELS) if args.model == "all" else [args.model]
    for name in names:
        path = prepare_embedded(name, force=args.force)
        print(f"model {name}: {path}")
    splits = load_text(args.data)
    print(f"text {splits.name}: train {len(splits.train):,} chars, "
          f"held-out {len(splits.heldout):,} chars")
