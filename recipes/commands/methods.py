"""`qalign methods`: every registered PTQ method, built-in or from a plug-in, with its options."""

from __future__ import annotations

import json

__all__ = ["method_table", "cmd_methods"]


def method_table() -> dict:
    """Every registered method (kind, whether it needs data, options and defaults, the package it
    came from) and the plug-ins that failed to load, with their errors."""
    import dataclasses

    from ptq.registry import PLUGIN_ERRORS, available_methods

    rows = []
    for name, m in sorted(available_methods().items()):
        options = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                   for f in dataclasses.fields(m.options)}
        rows.append({"name": name, "kind": m.kind, "needs_data": m.needs_data,
                     "source": m.source, "options": options,
                     "search_space": {k: list(v) for k, v in m.search_space.items()}})
    return {"methods": rows, "failed_plugins": dict(sorted(PLUGIN_ERRORS.items()))}


def cmd_methods(args) -> None:
    table = method_table()
    if args.json:
        print(json.dumps(table, indent=1, default=str))
        return
    rows = table["methods"]
    w_name = max([len("method"), *(len(r["name"]) for r in rows),
                  *map(len, table["failed_plugins"])])
    w_from = max([len("from"), *(len(r["source"]) for r in rows)])
    print(f"{'method':<{w_name}}  {'kind':<5}  {'data':<4}  {'from':<{w_from}}  options (defaults)")
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        print(f"{r['name']:<{w_name}}  {r['kind']:<5}  {'yes' if r['needs_data'] else 'no':<4}  "
              f"{r['source']:<{w_from}}  {opts}")
    for name, why in table["failed_plugins"].items():
        print(f"{name:<{w_name}}  FAILED to load: {why}")
