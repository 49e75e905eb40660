"""golem.io's scheduler keeps its jobs in modules of their own (settings, dispatcher, reader
pool, loop thread); sizes of modules and functions are checked by tests/test_layout.py."""

from __future__ import annotations

import ast
from pathlib import Path

IO = Path(__file__).resolve().parents[1] / "io"


def test_the_dispatcher_and_the_reader_pool_know_nothing_of_each_others_job():
    def imported(name):
        tree = ast.parse((IO / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} \
            | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}

    assert not {"threading", "golem.io.reader_pool", "golem.io.loop_thread"} & imported("dispatcher")
    assert not {"os", "golem.io.file_handles", "golem.io.positioned_reads", "golem.io.requests",
                "golem.io.staging"} & imported("reader_pool")
