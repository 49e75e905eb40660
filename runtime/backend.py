"""Whether MLX can run here, and what to install when it cannot.

On Linux the ``mlx`` wheel holds only the Python bindings; the library itself
(``libmlx.so``) comes from a backend wheel chosen by an extra: ``mlx[cpu]``,
``mlx[cuda12]`` or ``mlx[cuda13]``. An install without one fails at
``import mlx.core`` with a bare loader error; this module turns that into the one
line that names golem's extras. Knows nothing of models, files or flags.
"""

from __future__ import annotations

import sys
from typing import Optional

DISTRIBUTION = "golem-moe"
EXTRAS = (("cpu", "CPU"), ("cuda13", "NVIDIA, CUDA 13"), ("cuda12", "NVIDIA, CUDA 12"))


class BackendMissing(ImportError):
    """MLX is installed without a backend library (Linux without an mlx extra)."""


def install_hint() -> str:
    """The install lines for each Linux backend, e.g. ``pip install "golem-moe[cpu]" (CPU)``."""
    return ", ".join(f'pip install "{DISTRIBUTION}[{extra}]" ({what})' for extra, what in EXTRAS)


def missing_backend_message(platform: str = sys.platform) -> Optional[str]:
    """None when ``mlx.core`` imports; otherwise what is missing and how to install it.

    Any ImportError of ``mlx.core`` on Linux is reported with the extras: without
    a backend wheel the loader cannot find ``libmlx.so``, and the user's fix is the
    same whichever shared library is named.
    """
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        if not platform.startswith("linux"):
            return (f"mlx cannot be imported ({e}); reinstall it: "
                    f'pip install --force-reinstall "{DISTRIBUTION}"')
        return (f"mlx is installed without a backend ({e}). On Linux, install golem with one "
                f"of mlx's backend extras: {install_hint()}")
    return None


def require_backend() -> None:
    """Raise ``BackendMissing`` with the install lines when MLX cannot run here."""
    message = missing_backend_message()
    if message is not None:
        raise BackendMissing(message)
