"""The one ``charnn`` command: ``charnn SUB ARGS`` is ``charnn-SUB ARGS`` (the same parsing, exit status and JSON line).

The table names each subcommand's entry point as pyproject.toml's [project.scripts] does; nothing is
imported until one is chosen, so ``charnn --help`` prints without importing torch or Ray.
"""
from __future__ import annotations

import importlib
import runpy
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    target: str  # "module:function" as in [project.scripts], or a module run as ``python -m module``
    summary: str


COMMANDS = {
    "train": Command("charnn.cli.train:main", "train a model end to end: tokenise, train on Ray Train, sample"),
    "tokenize": Command("charnn.cli.tokenize:main", "tokenise a spec's corpus into row shards (the dataset only)"),
    "generate": Command("charnn.cli.generate:main", "sample text from a checkpoint or a registered model"),
    "retrain": Command("charnn.cli.retrain:main", "retrain when the corpus grows; publish only a better model"),
    "gc": Command("charnn.cli.gc:main", "remove what retraining no longer needs (a dry run without --apply)"),
    "serve": Command("charnn.cli.serve:main", "serve a registry's published model over HTTP (Ray Serve)"),
    "corpora": Command("charnn.data.corpora", "fetch a named corpus ahead of a run: charnn corpora NAME"),
}

USAGE = f"usage: charnn {{{','.join(COMMANDS)}}} ..."


def help_text() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join([USAGE, "", "A character-level GRU language model trained on Ray. Each command is also its",
                      "own script (charnn train is charnn-train, with the same options).", "", "commands:",
                      *lines, "", "charnn SUB --help prints SUB's own options."])


def dispatch(name: str, argv: Sequence[str]) -> None:
    """Run ``name`` as its own script would run: argparse names it ``charnn NAME`` in usage lines."""
    module, _, function = COMMANDS[name].target.partition(":")
    if not function and list(argv) in (["-h"], ["--help"]):  # a plain module has no parser to ask
        print(f"usage: charnn {name} ARGS (as python -m {module} ARGS)\n\n{COMMANDS[name].summary}")
        return
    sys.argv = [f"charnn {name}", *argv]
    if function:
        sys.exit(getattr(importlib.import_module(module), function)())
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(help_text(), file=sys.stderr)
        sys.exit(2)
    if args[0] in ("-h", "--help"):
        print(help_text())
        return
    if args[0] not in COMMANDS:
        print(f"charnn: error: unknown command {args[0]!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    dispatch(args[0], args[1:])


if __name__ == "__main__":
    main()
