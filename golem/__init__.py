"""golem: Mixture-of-Experts models whose experts do not fit in memory, on MLX and mlx-lm.

The top of the package owns its version and nothing else, so ``import golem`` is cheap and
loads no MLX. The work lives in the subpackages: ``golem.io`` (expert bytes from disk),
``golem.predictors`` (which experts come next), ``golem.runtime`` (the decode path, ``load``
and the command lines). ``python -m golem`` (or the ``golem`` command) lists the commands.
"""

from importlib.metadata import PackageNotFoundError, version as _version

DISTRIBUTION = "golem-moe"  # what pip installs and uninstalls; the import name is golem

try:
    __version__ = _version(DISTRIBUTION)  # the version pyproject.toml declares, the one place it is set
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["DISTRIBUTION", "__version__"]
