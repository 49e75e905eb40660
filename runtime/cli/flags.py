"""golem's own command-line flags (expert cache, memory budget, prefetch, storage, traces),
shared by every golem command that runs a model, derived from the option declarations of
``golem.runtime.options``.

``add_runtime_arguments(parser)`` adds one flag per declared option that has flags, in its
``--help`` group; ``runtime_config(args)`` turns the flags given into a
``golem.runtime.config.RuntimeConfig``, which fills in the declared defaults and runs every
check. Knows nothing of prompts, generation or printing.
"""

from __future__ import annotations

import argparse

from golem.runtime.config import RuntimeConfig
from golem.runtime.options import BY_NAME, declared


def add_runtime_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add golem's runtime flags to ``parser``, one group per declared group; returns ``parser``.

    Every flag's argparse default is None (not given): the declared default is filled in by
    ``RuntimeConfig``, and shown in the help.
    """
    groups = {}
    for o in declared():
        if not o.flags:
            continue
        if o.group not in groups:
            groups[o.group] = parser.add_argument_group(o.group)
        cli = dict(o.cli)
        if cli.get("action") == "negatable":  # --x and --no-x
            cli["action"] = argparse.BooleanOptionalAction
        groups[o.group].add_argument(*o.flags, dest=o.name, default=None, help=o.help_text(), **cli)
    return parser


def runtime_flags(args: argparse.Namespace) -> dict:
    """The runtime options given on the command line, by option name, plus the command lines'
    own defaults (``Option.command_default``) of those not given."""
    given = {o.name: getattr(args, o.name, None) for o in declared() if o.flags}
    return {name: value if value is not None else BY_NAME[name].command_default for name, value in given.items()
            if value is not None or BY_NAME[name].command_default is not None}


def runtime_config(args: argparse.Namespace, **fields) -> RuntimeConfig:
    """The ``RuntimeConfig`` of the flags given (``fields`` override); a flag given without
    what it needs, or a bad value, is a ``ConfigError`` naming the flag."""
    return RuntimeConfig(**{**runtime_flags(args), **fields})
