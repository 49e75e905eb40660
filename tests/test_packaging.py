"""Packaging: what pyproject declares matches what the code imports, the backend extras
match mlx's own, and an install without MLX's backend ends in one line naming them."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("io", "predictors", "runtime")


def project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def third_party_imports(folders) -> dict:
    """import name -> files, for every import that is neither stdlib nor golem."""
    found: dict = {}
    for folder in folders:
        local = {p.stem for p in (REPO / folder).rglob("*.py")}  # scripts importing siblings
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names | local | {"golem"}:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


# Import names that differ from their distribution's, for optional extras not installed here.
NOT_INSTALLED = {"PIL": "pillow"}


def distribution_of(import_name: str) -> str:
    dists = importlib.metadata.packages_distributions().get(import_name)
    if not dists:  # an optional extra (uvloop, aiofiles, matplotlib, ...) absent from this install
        return NOT_INSTALLED.get(import_name, import_name).lower().replace("_", "-")
    # mlx's Linux backends (mlx-cpu, mlx-cuda-*) also ship files under mlx/.
    names = sorted(d.lower().replace("_", "-") for d in dists)
    own = import_name.lower().replace("_", "-")
    return own if own in names else names[0]


def test_distribution_name_and_backend_extras_match_mlx():
    meta = project()
    assert meta["name"] == "golem-moe"
    deps = {requirement_name(r): r for r in meta["dependencies"]}
    # No backend forced: plain mlx everywhere, so an existing mlx[cuda13] is never replaced.
    assert "[" not in deps["mlx"] and ";" not in deps["mlx"]
    assert not any(n.startswith("mlx-c") for n in deps)
    extras = meta["optional-dependencies"]
    for extra in ("cpu", "cuda12", "cuda13"):
        (req,) = extras[extra]
        assert req.startswith(f"mlx[{extra}]"), req
        assert extra in importlib.metadata.metadata("mlx").get_all("Provides-Extra")


def test_console_scripts():
    scripts = project()["scripts"]
    assert scripts == {
        "golem-run": "golem.runtime.cli.run:main",
        "golem-trace": "golem.runtime.cli.trace:main",
        "golem-chat": "golem.runtime.cli.chat:main",
        "golem-server": "golem.runtime.cli.server:main",
    }
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
                 if e.name.startswith("golem-")}
    assert installed == scripts  # the editable install is current (pip install -e ".[cpu,test]")


def test_lower_bounds_are_the_tested_ones():
    deps = {requirement_name(r): r for r in project()["dependencies"]}
    assert deps["mlx-lm"] == "mlx-lm>=0.30.7"  # qwen3_5_moe and has_chat_template arrive here
    assert deps["mlx"] == "mlx>=0.30.4"  # what mlx-lm 0.30.7 asks for


def test_every_imported_package_is_declared_and_every_dependency_used():
    meta = project()
    required = {requirement_name(r) for r in meta["dependencies"]}
    optional = {requirement_name(r) for reqs in meta["optional-dependencies"].values() for r in reqs}
    runtime = third_party_imports(SOURCES)
    for name, files in runtime.items():
        dist = distribution_of(name)
        assert dist in required | optional, f"{dist} (imported by {sorted(files)}) is not declared"
    used = {distribution_of(n) for n in runtime}
    assert required <= used, f"declared but not imported: {sorted(required - used)}"
    benches = {distribution_of(n) for n in third_party_imports(["benchmarks"])}
    assert "aiofiles" in benches and "aiofiles" not in required
    assert "uvloop" not in required  # optional in the code (plain asyncio without it)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mlx backends are Linux extras")
def test_mlx_without_backend_ends_in_one_line_naming_the_extras(tmp_path):
    # mlx's own bindings without lib/libmlx.so: what `pip install golem-moe` without an extra
    # leaves on Linux. The real extension module fails to load exactly as it would there.
    import mlx.core

    real = Path(mlx.core.__file__).parent
    fake = tmp_path / "mlx"
    shutil.copytree(real, fake, ignore=shutil.ignore_patterns("lib", "include", "share",
                                                               "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for script in ("golem.runtime.cli.run", "golem.runtime.cli.trace", "golem.runtime.cli.chat",
                   "golem.runtime.cli.server"):
        done = subprocess.run([sys.executable, "-m", script, "--help"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        for extra in ("cpu", "cuda13", "cuda12"):
            assert f'pip install "golem-moe[{extra}]"' in lines[0]
        assert "libmlx" in lines[0]
    library = subprocess.run(
        [sys.executable, "-c", "import golem.runtime; golem.runtime.load"],
        env=env, capture_output=True, text=True, timeout=60)
    assert library.returncode == 1
    assert "BackendMissing" in library.stderr and "golem-moe[cpu]" in library.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mlx backends are Linux extras")
def test_two_backends_at_once_are_named_with_the_way_to_keep_one(tmp_path):
    # A second backend's metadata beside the installed one: what `pip install golem[cuda]`
    # over mlx[cpu] used to leave (both wheels write mlx/lib/libmlx.so).
    installed = {d for d in ("mlx-cpu", "mlx-cuda-12", "mlx-cuda-13") if _installed(d)}
    extra = "mlx-cuda-13" if "mlx-cuda-13" not in installed else "mlx-cpu"
    info = tmp_path / f"{extra.replace('-', '_')}-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {extra}\nVersion: 0.0.0\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "golem.runtime.cli.trace", "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: golem-trace")
    (warning,) = [line for line in done.stderr.splitlines() if line.startswith("golem: warning:")]
    assert extra in warning and "libmlx.so" in warning and "pip uninstall -y" in warning
    assert 'pip install "golem-moe[cuda13]"' in warning  # the GPU backend is the one kept
    if len(installed) == 1:  # as installed here: one backend, no warning
        clean = subprocess.run([sys.executable, "-m", "golem.runtime.cli.trace", "--help"],
                               capture_output=True, text=True, timeout=60)
        assert clean.returncode == 0 and "golem: warning" not in clean.stderr


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
