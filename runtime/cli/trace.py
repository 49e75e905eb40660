"""golem-trace: read golem-trace/1 files and report on them; ``cache`` lists (and removes) what
golem keeps on disk.

Each subcommand lives in ``golem.runtime.cli.trace_commands.<name>`` and exposes
``add_parser(subparsers)``, which registers its parser and sets ``func``. Every
subcommand takes ``--json`` and then prints one JSON object as its last line. A user's
mistake (a bad flag value, a damaged trace, an unwritable output) ends in one line on
stderr and exit code 2; an internal error keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from golem.runtime.cli import error_line
from golem.runtime.cli.about import add_version_flag
from golem.runtime.cli.progress import show_library_warnings
from golem.runtime.trace import TraceError

SUBCOMMANDS = ("stats", "simulate", "plot", "predict", "estimate", "cache")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="golem-trace", description="Inspect golem-trace/1 routing traces; list or clear golem's cache folder.")
    add_version_flag(parser, "golem-trace")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"golem.runtime.cli.trace_commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"golem.runtime.cli.trace_commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def stdout_closed() -> int:
    """The reader of our output went away (``| head``): stop quietly, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush then has nowhere to fail
    return 141


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    show_library_warnings()
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return stdout_closed()
    except (TraceError, ValueError, OSError) as e:  # user mistakes: one line, no traceback
        print(error_line(f"golem-trace {args.command}", e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("golem-trace: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
