"""Subcommands of ``golem-trace``: one module each, exposing ``add_parser(subparsers)``."""
