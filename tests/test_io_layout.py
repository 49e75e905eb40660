"""golem.io stays readable: no module over 600 lines, no function over 80, and the
scheduler's jobs in modules of their own (settings, dispatcher, reader pool, loop thread)."""

from __future__ import annotations

import ast
from pathlib import Path

IO = Path(__file__).resolve().parents[1] / "io"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def test_no_io_module_over_600_lines_and_no_function_over_80():
    too_long = []
    for path in sorted(IO.glob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, too_long


def test_the_dispatcher_and_the_reader_pool_know_nothing_of_each_others_job():
    def imported(name):
        tree = ast.parse((IO / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} \
            | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}

    assert not {"threading", "golem.io.reader_pool", "golem.io.loop_thread"} & imported("dispatcher")
    assert not {"os", "golem.io.file_handles", "golem.io.positioned_reads", "golem.io.requests",
                "golem.io.staging"} & imported("reader_pool")
