"""Test helpers: greedy token streams from stock mlx-lm and from golem."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List

import mlx.core as mx

PROMPT = "Once upon a time there was a small computer that read experts from its disk"


def prompt_tokens(tokenizer, text: str = PROMPT) -> List[int]:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def greedy_tokens(model, tokens: List[int], n: int = 24) -> List[int]:
    """``n`` greedy tokens through mlx-lm's own decode loop."""
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(mx.array(tokens), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)):
        out.append(int(token))
    return out


def stock(path):
    from mlx_lm import load

    return load(str(path))


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module of its own (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
