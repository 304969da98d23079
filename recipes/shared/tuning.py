"""Matched tuning: the same number of trials for every method, chosen on a validation slice.

Each method declares its search space as data next to its options: PTQ methods in the registry
(`ptq.register_method(..., search_space=...)`: GPTQ's damp, act_order, clip_search,
static_groups; RTN's clip_search), fine-tuning in `qaft.QAFT_SEARCH_SPACE` (learning rate on a
log grid, scale mode, loss). A study may narrow or widen a space with `METHOD.FIELD=V1,V2` entries.
`draw_trials` takes every point of the grid in a seeded random order and keeps the first
`trials` (random search over the grid; a grid smaller than `trials` is run whole), so every
method gets the same number of trials. Each trial runs on the same budget; its validation NLL is
measured on the validation slice (train-split windows disjoint from the budget and from the
held-out text: `DataBudget.validation_blocks`); the lowest wins. Held-out text never chooses.
"""

from __future__ import annotations

import itertools
import random

from ptq.errors import OptionsError
from recipes.shared.flags import coerce

__all__ = ["grid", "draw_trials", "parse_space_entry", "merge_spaces"]


def grid(space: dict[str, tuple]) -> list[dict]:
    """Every point of the product of the value tuples, in a fixed (lexicographic) order."""
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def draw_trials(space: dict[str, tuple], trials: int, seed: int) -> list[dict]:
    """The first `trials` points of the grid in a seeded random order; [{}] for an empty space
    (the pinned options, one trial)."""
    if trials < 1:
        raise OptionsError(f"trials={trials}: give at least 1")
    points = grid(space) if space else [{}]
    random.Random(seed).shuffle(points)
    return points[:trials]


def parse_space_entry(text: str, field_types: dict[str, dict[str, object]]) -> tuple[str, str,
                                                                                      tuple]:
    """'gptq.damp=0.01,0.1' -> ("gptq", "damp", (0.01, 0.1)), values typed by the field's type.
    field_types: {method: {field: type}} of what each method may tune."""
    head, sep, values = text.partition("=")
    method, dot, key = head.strip().partition(".")
    known = ", ".join(f"{m}.{k}" for m, fields in field_types.items() for k in fields)
    if not sep or not dot or method not in field_types or key not in field_types[method]:
        raise OptionsError(f"search entry {text!r}: write METHOD.FIELD=V1,V2 with METHOD.FIELD "
                           f"one of {known}")
    parts = [v.strip() for v in values.split(",") if v.strip()]
    if not parts:
        raise OptionsError(f"search entry {text!r}: give at least one value after '='")
    typed = tuple(coerce(v, field_types[method][key], f"search entry {text!r}") for v in parts)
    return method, key, typed


def merge_spaces(defaults: dict[str, dict[str, tuple]], entries, field_types
                 ) -> dict[str, dict[str, tuple]]:
    """The methods' declared spaces with the study's `METHOD.FIELD=...` entries applied on top
    (an entry replaces that field's values)."""
    spaces = {m: dict(s) for m, s in defaults.items()}
    for entry in entries:
        method, key, values = parse_space_entry(entry, field_types)
        spaces.setdefault(method, {})[key] = values
    return spaces
