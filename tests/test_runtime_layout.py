"""golem.runtime's live path stays readable: no module over 600 lines and no function over 80
(``runtime/`` and ``runtime/pipeline/``; the command lines and the offline tools are checked
where they live), and the load path reads straight through: ``load_offloaded`` builds the
engine complete, nothing is attached to it afterwards."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _live_modules():
    return sorted(RUNTIME.glob("*.py")) + sorted((RUNTIME / "pipeline").glob("*.py"))


def test_no_live_runtime_module_over_600_lines_and_no_function_over_80():
    too_long = []
    for path in _live_modules():
        source = path.read_text()
        name = path.relative_to(RUNTIME)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, too_long


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
