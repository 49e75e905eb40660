"""Packaging glue that pyproject.toml cannot say: the three source folders at the root install
as subpackages of the package ``golem`` (``io/`` -> ``golem.io``; a top-level ``io`` would
shadow Python's own), and every subfolder with an ``__init__.py`` is found, not listed.
``golem/`` itself holds only the version and ``python -m golem``; being a regular package (not
a namespace), it is removed whole by ``pip uninstall``."""

from pathlib import Path

from setuptools import setup

ROOTS = {"golem": "golem", "golem.io": "io", "golem.predictors": "predictors", "golem.runtime": "runtime"}


def packages():
    found = []
    for name, folder in ROOTS.items():
        for init in sorted(Path(folder).rglob("__init__.py")):
            rel = init.parent.relative_to(folder).parts
            found.append(".".join((name, *rel)))
    return found


setup(package_dir=ROOTS, packages=packages())
