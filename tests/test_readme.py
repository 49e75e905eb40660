"""The README's code blocks run as written, each on a fresh cache (``GOLEM_CACHE`` in an empty
folder), as a new user would run them.

Rules, checked here so that none can be bent quietly:
- A block preceded by ``SKIP_MARK`` is not run, and only because it needs a model downloaded from
  Hugging Face: every command in it names a ``--model`` that is a hub repo id or a folder that
  does not exist here. Every other block runs.
- ``path/to/model`` in a Python block stands for a model folder: the demo checkpoint
  ``golem-run --demo`` builds (built into the block's fresh cache first).
- ``pip install`` commands are checked, not run (this suite runs inside that install): the
  extras they name exist and the distribution is installed. ``python -m pytest`` collects the
  suite (``--collect-only``) rather than running it again from inside itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP_MARK = "<!-- readme-test: skip (needs a model downloaded from Hugging Face) -->"
PLACEHOLDER = "path/to/model"
TIMEOUT_S = 600


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skipped: bool

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks() -> list:
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n", before == SKIP_MARK))
        i = end + 1
    return blocks


BLOCKS = readme_blocks()


def _env(cache: Path) -> dict:
    bindir = str(Path(sys.executable).parent)  # this install's golem-run, golem-trace, python
    return {**os.environ, "GOLEM_CACHE": str(cache), "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def _run(args, cache: Path, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=TIMEOUT_S, **kw)
    shown = " ".join(map(str, args)) if isinstance(args, list) else args
    assert done.returncode == 0, f"{shown}: exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, f"{shown}:\n{done.stderr[-3000:]}"
    return done


def _check_pip_install(words: list) -> None:
    import importlib.metadata
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    target = words[-1]
    spec = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
    assert spec, f"pip install names {target!r}, not this folder"
    for extra in (spec.group(1) or "").split(","):
        assert not extra or extra in extras, f"pip install names the extra {extra!r}, which pyproject lacks"
    importlib.metadata.distribution("golem-moe")  # the install this suite runs in


def _run_shell(block: Block, cache: Path) -> None:
    for line in block.text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for command in line.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                _check_pip_install(words)
            elif words[:3] == ["python", "-m", "pytest"]:
                done = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", *words[3:]], cache)
                collected = re.findall(r"^tests/\S+\.py: (\d+)$|(\d+) tests? collected", done.stdout, re.M)
                assert collected and "test_readme.py" in done.stdout, done.stdout[-500:]
            else:
                done = _run(["bash", "-c", command.strip()], cache)
                if "--demo" in words:  # a first run, not on a terminal: one summary line per stage
                    assert done.stderr.count("[golem] built the demo checkpoint in") == 1, done.stderr
                    assert done.stderr.count("[golem] loading ") == 1 and "\r" not in done.stderr


def _run_python(block: Block, cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    code = block.text
    if PLACEHOLDER in code:
        _run([sys.executable, "-c", "from golem.runtime.cli.demo import demo_model; demo_model()"], cache)
        demo = cache / "demo-qwen3_moe"
        assert (demo / "config.json").is_file()
        code = code.replace(PLACEHOLDER, str(demo))
    script = tmp_path / f"readme_{block.line}.py"
    script.write_text(code)
    return _run([sys.executable, str(script)], cache)


def test_the_readme_has_blocks_of_each_kind():
    langs = {b.lang for b in BLOCKS if not b.skipped}
    assert "python" in langs and "" in langs
    assert sum(b.skipped for b in BLOCKS) >= 1


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skipped], ids=lambda b: b.name)
def test_skipped_blocks_only_need_a_download(block):
    commands = [line for line in block.text.splitlines() if line.strip()]
    assert commands
    for command in commands:
        words = shlex.split(command)
        if words[0] == "mlx.launch":  # several ranks: the command after the launcher's "--"
            words = words[words.index("--") + 1:]
        assert words[0].startswith("golem-") and "--model" in words, f"{block.name}: {command}"
        model = words[words.index("--model") + 1]
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith(".")
        assert hub_id or not (REPO / model).exists(), f"{block.name}: {model} is neither a hub id nor absent"
        assert model.startswith(("./", "mlx-community/")), f"{block.name}: {model}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.skipped], ids=lambda b: b.name)
def test_block_runs_on_a_fresh_cache(block, tmp_path):
    cache = tmp_path / "golem-cache"  # absent: a machine golem never ran on
    if block.lang == "python":
        done = _run_python(block, cache, tmp_path)
        assert done.stdout.strip()
        if 'warm_start="saved"' in block.text:  # the first run: no profile yet, one warning, then one saved
            assert done.stderr.count("no profile saved for this model yet") == 1
            assert list((cache / "profiles").rglob("golem-profile.json"))
    elif block.lang in ("", "sh", "bash", "console"):
        _run_shell(block, cache)
    elif block.lang == "json":  # a file to write (a hosts file): it must at least be JSON
        json.loads(block.text)
    else:
        pytest.fail(f"{block.name}: a ```{block.lang} block; say here how to run it")
