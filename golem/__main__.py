"""``python -m golem`` and the ``golem`` command: list golem's commands (``--version``: the
version). Like every command, it first checks that MLX's backend is installed."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list] = None) -> int:
    from golem.runtime.cli.about import add_version_flag, commands_text

    parser = argparse.ArgumentParser(prog="golem", description=commands_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_flag(parser, "golem")
    parser.parse_args(argv)
    print(commands_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
