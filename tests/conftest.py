"""Shared fixtures: generated checkpoints (built once per test session, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from golem.runtime.synthetic import FAMILIES, build_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO.parent / "shared" / "traces" / "olmoe-1b-7b"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> folder of a tiny generated checkpoint (16 experts, top-4)."""
    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_checkpoint(family, root / family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def olmoe_traces():
    if not (TRACES / "general.npz").exists():
        pytest.skip("OLMoE traces not present (../shared/traces)")
    return TRACES
