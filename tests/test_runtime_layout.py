"""golem.runtime's load path reads straight through: ``load_offloaded`` builds the engine
complete, nothing is attached to it afterwards (sizes of modules and functions are checked by
tests/test_layout.py)."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


def _live_modules():
    return sorted(RUNTIME.glob("*.py")) + sorted((RUNTIME / "pipeline").glob("*.py"))


def test_the_engine_is_built_complete():
    """Its recorder, prefetcher and scheduler are constructor arguments: no module of the live
    runtime sets them on an engine it did not just build itself (``self``)."""
    attached = []
    for path in _live_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                if (isinstance(target, ast.Attribute) and target.attr in ("trace", "prefetcher", "scheduler")
                        and not (isinstance(target.value, ast.Name) and target.value.id == "self")):
                    attached.append(f"{path.relative_to(RUNTIME)}:{node.lineno} {ast.unparse(target)}")
    assert not attached, attached


def test_the_recorder_reaches_the_engine_through_load(checkpoints):
    from golem.runtime import load
    from golem.runtime.recorder import TraceRecorder

    path = checkpoints("qwen3_moe")
    with load(path, cache_size=4, record=True) as loaded:
        assert isinstance(loaded.runtime.engine.trace, TraceRecorder)
    with load(path, cache_size=4) as loaded:
        assert loaded.runtime.engine.trace is None
