"""The shape of golem's imports: no import circle among its modules (imports inside functions
included), and loading a model imports nothing of the offline tools (runtime/analysis/)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"golem.io": ROOT / "io", "golem.runtime": ROOT / "runtime", "golem.predictors": ROOT / "predictors"}


def _modules() -> dict:
    """Module name -> source file, for every module of the three source folders."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def import_graph() -> dict:
    """Module -> the golem modules it imports anywhere in its source (a package's own
    ``__init__`` is not counted as imported by its submodules)."""
    modules = _modules()

    def resolve(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                for a in node.names:
                    full = f"{base}.{a.name}"
                    deps.add(full if full in modules else resolve(base))
        deps.discard(None)
        deps.discard(name)
        graph[name] = deps
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = import_graph()
    assert "golem.runtime.config" in graph and "golem.runtime.options" in graph["golem.runtime.config"]
    cycles = _cycles(graph)
    detail = "; ".join(" <-> ".join(c) for c in cycles)
    assert not cycles, f"import circles: {detail}"


LOADS = """
import json, sys
import golem.runtime

path = sys.argv[1]
seen = {}
for name, options in [
    ("plain", {}),
    ("cache size", {"cache_size": 4}),
    ("memory budget", {"memory_budget": "1.5MB"}),
    ("random warm start", {"cache_size": 4, "warm_random": 3}),
    ("saved profile", {"memory_budget": "1.5MB", "warm_start": "saved"}),
    ("prefetch", {"cache_size": 4, "prefetch_depth": 2, "threshold": 0.1}),
]:
    with golem.runtime.load(path, **options):
        seen[name] = sorted(m for m in sys.modules if m.startswith("golem.runtime.analysis"))
print(json.dumps(seen))
"""


def test_loading_imports_nothing_of_the_offline_tools(checkpoints, tmp_path, monkeypatch):
    import os

    from golem.runtime import load
    from helpers import greedy_tokens, prompt_tokens

    monkeypatch.setenv("GOLEM_CACHE", str(tmp_path / "cache"))
    path = str(checkpoints("deepseek_v3"))
    with load(path, cache_size=4, save_profile=True) as (model, tokenizer):  # the profile "saved" reads
        greedy_tokens(model, prompt_tokens(tokenizer), 4)
    env = {**os.environ, "GOLEM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", LOADS, path], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen) == 6 and all(modules == [] for modules in seen.values()), seen
