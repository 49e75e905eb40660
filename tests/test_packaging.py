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
        "golem-pack": "golem.runtime.cli.pack:main",
        "golem": "golem.__main__:main",
    }
    installed = {e.name: e.value for e in importlib.metadata.distribution("golem-moe").entry_points
                 if e.group == "console_scripts"}
    assert installed == scripts  # the editable install is current (pip install -e ".[cpu,test]")


def test_bounds_are_the_tested_ones():
    deps = {requirement_name(r): r for r in project()["dependencies"]}
    # 0.30.7: qwen3_5_moe and has_chat_template arrive; < 0.33: golem-chat and golem-server
    # swap names inside mlx_lm.chat and mlx_lm.server, tested up to the 0.32 series.
    assert deps["mlx-lm"] == "mlx-lm>=0.30.7,<0.33"
    assert deps["mlx"] == "mlx>=0.30.4"  # what mlx-lm 0.30.7 asks for


def test_installed_mlx_lm_is_one_golem_is_tested_with():
    from packaging.requirements import Requirement

    deps = {requirement_name(r): Requirement(r) for r in project()["dependencies"]}
    for name in ("mlx-lm", "mlx"):
        installed = importlib.metadata.version(name)
        assert deps[name].specifier.contains(installed, prereleases=True), (
            f"{name} {installed} is installed, outside {deps[name].specifier} (pyproject.toml): run "
            "tests/test_chat.py and tests/test_server.py with it, then widen the range")


def test_license_classifiers_and_urls():
    meta = project()
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the golem authors" in text
    assert "Programming Language :: Python :: 3" in meta["classifiers"]
    assert not any(c.startswith("License ::") for c in meta["classifiers"])  # the expression says it
    known = pytest.importorskip("trove_classifiers").classifiers  # the list PyPI accepts
    assert [c for c in meta["classifiers"] if c not in known] == []
    assert meta["urls"] and all(u.startswith("https://") for u in meta["urls"].values())
    installed = importlib.metadata.metadata("golem-moe")  # the editable install is current
    assert installed["License-Expression"] == "MIT"


def _version_line(args) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout.strip()


def test_every_command_shows_one_version():
    import golem

    declared = project()["version"]
    assert golem.__version__ == declared == importlib.metadata.version("golem-moe")
    bindir = Path(sys.executable).parent
    mlx, mlx_lm = importlib.metadata.version("mlx"), importlib.metadata.version("mlx-lm")
    for prog in ("golem-run", "golem-trace", "golem-chat", "golem-server", "golem"):
        line = _version_line([str(bindir / prog), "--version"])
        assert line == f"{prog} {declared} (mlx {mlx}, mlx-lm {mlx_lm})"
    printed = _version_line([sys.executable, "-c", "import golem; print(golem.__version__)"])
    assert printed == declared


def test_python_m_golem_lists_every_command():
    listing = _version_line([sys.executable, "-m", "golem"])
    assert listing.splitlines()[0].startswith(f"golem {project()['version']} (golem-moe)")
    listed = [line.split()[0] for line in listing.splitlines() if line.startswith("  golem-")]
    assert sorted(listed) == sorted(n for n in project()["scripts"] if n != "golem")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="venv layout checked on Linux")
def test_wheel_carries_license_and_uninstalls_without_leftovers(tmp_path):
    import zipfile

    pytest.importorskip("setuptools", minversion="77")  # the test extra brings it
    source = tmp_path / "src"
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for folder in ("golem", *SOURCES):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("golem_moe-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert f"{info}/licenses/LICENSE" in names
        assert z.read(f"{info}/licenses/LICENSE").decode() == (REPO / "LICENSE").read_text()
        metadata = z.read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata and "Project-URL: Homepage" in metadata
    assert "golem/__init__.py" in names and "golem/__main__.py" in names
    assert "golem/runtime/cli/run.py" in names and "golem/io/index.py" in names
    assert not any(n.startswith(("io/", "runtime/", "predictors/", "tests/")) for n in names)

    # Into a fresh virtual environment that sees this one's packages (mlx, mlx-lm) underneath.
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)],
                   check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    into = [*pip, "--python", str(python)]
    subprocess.run([*into, "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert (site / "golem" / "__init__.py").is_file()
    outside = tmp_path / "elsewhere"  # not the repository, whose folders would shadow the wheel's
    outside.mkdir()
    shown = subprocess.run([str(python), "-c", "import golem, golem.runtime.cli.about as a; "
                            "print(golem.__version__, golem.__file__, a.__file__)"],
                           cwd=outside, check=True, capture_output=True, text=True, timeout=120)
    version, init, about = shown.stdout.split()
    assert version == project()["version"]
    assert Path(init).parent == site / "golem" and Path(about).is_relative_to(site / "golem")
    subprocess.run([*into, "uninstall", "-y", "-q", "golem-moe"], check=True, capture_output=True, timeout=300)
    assert not (site / "golem").exists()
    assert not list(site.glob("golem_moe*"))


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
