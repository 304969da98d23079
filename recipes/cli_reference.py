"""The command-line reference, `docs/cli.md`, generated from the `qalign` parser itself.

    python -m recipes.cli_reference > docs/cli.md            # regenerate after changing a flag
    python -m recipes.cli_reference --check docs/cli.md      # exit 1 when the page is stale

Every subcommand and recipe gets a section with its description and one row per flag (the flag,
its default, its help). `tests/recipes/test_cli_reference.py` fails when docs/cli.md differs from
what this prints, so the page documents exactly the flags that exist. Only the methods that ship
with qalign are included (a plug-in's option flags appear in `qalign --plugin FILE ... --help`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HEADER = """# Command-line reference

Generated from the argument parser by `python -m recipes.cli_reference > docs/cli.md`; a test
fails when this page and the parser disagree. Every command also answers `--help`. Flags map 1:1
onto the library's option dataclasses: a flag that does not apply to the chosen method or mode is
an error, and every mistake is one `qalign: error: ...` line naming the fix (exit 2), printed
before a model or text is loaded. `--model`, `--data` and the spec strings are described in
[evaluation.md](evaluation.md) and [formats.md](formats.md).
"""


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    takes_value = action.nargs != 0
    if takes_value:
        metavar = action.metavar or (f"{{{','.join(map(str, action.choices))}}}"
                                     if action.choices else action.dest.split(".")[-1].upper())
        suffix = " ..." if action.nargs in ("*", "+") else ""
        names += f" `{metavar}{suffix}`"
    return names


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or action.required:
        return "required" if action.required else ""
    if isinstance(action.default, (list, tuple)):
        return " ".join(map(str, action.default))
    if action.nargs == 0 and action.default is False:
        return ""
    return f"`{action.default}`"


def _section(parser: argparse.ArgumentParser, name: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{name}`", ""]
    if parser.description:
        lines += [parser.description, ""]
    rows, subcommands = [], None
    for action in parser._actions:  # argparse keeps no public list of a parser's arguments
        if isinstance(action, argparse._SubParsersAction):
            subcommands = action
        elif not isinstance(action, argparse._HelpAction):
            rows.append(f"| {_cell(_flag(action))} | {_cell(_default(action))} | "
                        f"{_cell(action.help or '')} |")
    if rows:
        lines += ["| flag | default | what it does |", "|---|---|---|", *rows, ""]
    if subcommands is not None:
        helps = {a.dest: a.help for a in subcommands._choices_actions}
        lines += [f"- `{name} {n}`: {helps.get(n, '')}" for n in subcommands.choices] + [""]
        for n, sub in subcommands.choices.items():
            lines += _section(sub, f"{name} {n}", min(level + 1, 4))
    return lines


def reference() -> str:
    """docs/cli.md as the parser defines it now."""
    from recipes.cli import build_parser

    return HEADER + "\n" + "\n".join(_section(build_parser(), "qalign", 2)).rstrip() + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m recipes.cli_reference",
                                description="Print the CLI reference page (docs/cli.md).")
    p.add_argument("--check", type=Path, metavar="FILE",
                   help="compare with FILE instead of printing; exit 1 when it differs")
    args = p.parse_args(argv)
    text = reference()
    if args.check is None:
        sys.stdout.write(text)
    elif not args.check.is_file() or args.check.read_text() != text:
        print(f"{args.check} is out of date: run python -m recipes.cli_reference > {args.check}",
              file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
