"""What every command says about itself: ``--version`` and the list of golem's commands.

Versions come from installed metadata (``importlib.metadata``): golem's is the one
pyproject.toml declares (``golem.__version__``), and nothing here loads a model.
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

import golem

# Every console script and what it does, in the order ``python -m golem`` lists them.
COMMANDS = {
    "golem-run": "generate text as mlx_lm.generate does (--demo: a first run, no download)",
    "golem-chat": "chat as mlx_lm.chat does",
    "golem-server": "serve mlx_lm.server's OpenAI-compatible HTTP API",
    "golem-pack": "copy a model's experts into one read each (read by every command after it)",
    "golem-trace": "routing traces: stats, simulate, plot, predict, estimate; and cache "
                   "(what golem keeps on disk)",
}


def extra_hint(extra: str, package: str) -> str:
    """How to install an optional extra, by the distribution's name (``golem`` on PyPI is
    another project): ``pip install "golem-moe[plot]" (or pip install matplotlib)``."""
    return f'pip install "{golem.DISTRIBUTION}[{extra}]" (or pip install {package})'


PLOT_EXTRA_HINT = extra_hint("plot", "matplotlib")


def _installed(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def version_text(prog: str) -> str:
    """``golem-run 0.1.0 (mlx 0.32.4, mlx-lm 0.32.2)``: golem's version and the two it runs on."""
    return f"{prog} {golem.__version__} (mlx {_installed('mlx')}, mlx-lm {_installed('mlx-lm')})"


def add_version_flag(parser: argparse.ArgumentParser, prog: str) -> None:
    """``--version``: print ``version_text(prog)`` and exit 0."""
    parser.add_argument("--version", action="version", version=version_text(prog),
                        help="Print golem's version (and mlx's and mlx-lm's) and exit.")


def commands_text() -> str:
    """What ``python -m golem`` prints: the version and one line per command."""
    width = max(map(len, COMMANDS))
    lines = [f"golem {golem.__version__} ({golem.DISTRIBUTION}): Mixture-of-Experts models whose experts",
             "stream from disk, on MLX and mlx-lm", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "Each takes --help and --version. From Python, golem.runtime.load(path, ...) returns",
              "a model and tokenizer that mlx-lm's generate and stream_generate drive unchanged."]
    return "\n".join(lines)
