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


BACKEND_DISTRIBUTIONS = {"mlx-cpu": "cpu", "mlx-cuda-12": "cuda12", "mlx-cuda-13": "cuda13"}


def backend_conflict_message() -> Optional[str]:
    """None unless several of mlx's Linux backends are installed at once.

    Their wheels all ship ``mlx/lib/libmlx.so``: the one installed last wins, whatever
    the user asked for, and uninstalling any one of them deletes the shared file.
    """
    import importlib.metadata

    installed = []
    for dist in BACKEND_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed.append(dist)
    if len(installed) < 2:
        return None
    import mlx.core as mx

    keep = next(BACKEND_DISTRIBUTIONS[d] for d in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cpu") if d in installed)
    return (f"{' and '.join(installed)} are installed together and share mlx/lib/libmlx.so, so MLX runs "
            f"on whichever came last (now {mx.default_device()}); keep one: "
            f"pip uninstall -y {' '.join(installed)} && pip install \"{DISTRIBUTION}[{keep}]\"")


def require_backend() -> None:
    """Raise ``BackendMissing`` with the install lines when MLX cannot run here."""
    message = missing_backend_message()
    if message is not None:
        raise BackendMissing(message)
