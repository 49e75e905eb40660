"""Test helpers: greedy token streams from stock mlx-lm and from golem."""

from __future__ import annotations

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
