"""What golem-server accepts in a request body, checked before anything runs.

Owns the type and range of every field mlx-lm's server reads from a completion or chat
request (``stop``, ``seed``, ``logit_bias``, sampling numbers, ``messages``, ...): a field
that would fail later, in the generation thread that every request shares, is refused here
with a ``BadRequest`` naming it. Also fills in what mlx-lm would otherwise look up and fail
on (``stream_options`` without ``include_usage``). Knows nothing of HTTP or models: the
caller passes the vocabulary size.
"""

from __future__ import annotations

import math
from typing import Any, Optional

MAX_STOP_WORDS = 16
MAX_STOP_CHARS = 1024
SEED_LIMIT = 2 ** 64  # mx.random.seed takes an unsigned 64-bit seed


class BadRequest(ValueError):
    """A request field of the wrong type or out of range (answered with HTTP 400)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int(body: dict, name: str, low: Optional[int] = None, high: Optional[int] = None, *,
         also: tuple = ()) -> None:
    if name not in body or body[name] is None:
        return
    value = body[name]
    if value in also and _is_int(value):
        return
    if not _is_int(value):
        raise BadRequest(f"{name} must be an integer, got {value!r:.60}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise BadRequest(f"{name} must be {bounds}, got {value}")


def _number(body: dict, name: str, low: Optional[float] = None, high: Optional[float] = None) -> None:
    if name not in body or body[name] is None:
        return
    value = body[name]
    if not _is_number(value):
        raise BadRequest(f"{name} must be a finite number, got {value!r:.60}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise BadRequest(f"{name} must be {bounds}, got {value}")


def _kind(body: dict, name: str, kind, what: str) -> None:
    if name in body and body[name] is not None and not isinstance(body[name], kind):
        raise BadRequest(f"{name} must be {what}, got {type(body[name]).__name__}")


def _messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content")
        if not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}].role must be a string")
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts, "
                             f"got {type(content).__name__}")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(f"{where} must be an object with a type")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}.text must be a string")
            url = part.get("image_url", part.get("image"))
            if part["type"] in ("image_url", "input_image", "image"):
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise BadRequest(f"{where}: an image part needs a URL string")
        calls = m.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
            raise BadRequest(f"messages[{i}].tool_calls must be a list of objects")


def check_request(body: Any, path: str, vocab_size: Optional[int]) -> dict:
    """Check a parsed request ``body`` for ``path`` (``/v1/completions`` or a chat path);
    returns the body to hand to mlx-lm (the same object, completed where mlx-lm would fail
    on an absent key).

    Raises:
        BadRequest: naming the field, its value and what it must be.
    """
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    if path == "/v1/completions":
        if not isinstance(body.get("prompt"), str):
            raise BadRequest("prompt must be a string (a text completion request needs one)")
    else:
        _messages(body.get("messages"))
        _kind(body, "tools", list, "a list of tool objects")
        if body.get("tools") is not None and not all(isinstance(t, dict) for t in body["tools"]):
            raise BadRequest("tools must be a list of objects")
        _kind(body, "role_mapping", dict, "an object of role prefixes")
        if body.get("role_mapping") is not None and not all(
                isinstance(v, str) for v in body["role_mapping"].values()):
            raise BadRequest("role_mapping values must be strings")
    for name in ("stream", "logprobs"):
        _kind(body, name, bool, "true or false")
    for name in ("model", "draft_model"):
        _kind(body, name, str, "a string")
    _kind(body, "adapters", str, "a string")
    _kind(body, "chat_template_kwargs", dict, "an object")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest(f"stream_options must be an object, got {type(options).__name__}")
        _kind(options, "include_usage", bool, "true or false")
        options.setdefault("include_usage", False)
        if options["include_usage"] is None:
            options["include_usage"] = False
    _int(body, "max_tokens", 1)
    _int(body, "max_completion_tokens", 1)
    _int(body, "num_draft_tokens", 0, 64)
    _int(body, "top_k", 0)
    _int(body, "top_logprobs", 0, 11, also=(-1,))
    for name in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
        _int(body, name, 0, 1 << 20)
    _int(body, "seed", 0, SEED_LIMIT - 1)
    _number(body, "temperature", 0)
    _number(body, "top_p", 0, 1)
    _number(body, "min_p", 0, 1)
    _number(body, "repetition_penalty", 0)
    _number(body, "presence_penalty")
    _number(body, "frequency_penalty")
    _number(body, "xtc_probability", 0, 1)
    _number(body, "xtc_threshold", 0, 1)

    stop = body.get("stop")
    if stop is not None:
        words = [stop] if isinstance(stop, str) else stop
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise BadRequest("stop must be a string or a list of strings")
        if len(words) > MAX_STOP_WORDS:
            raise BadRequest(f"stop: at most {MAX_STOP_WORDS} sequences, got {len(words)}")
        for w in words:
            if not w or len(w) > MAX_STOP_CHARS:
                raise BadRequest(f"stop sequences must be 1 to {MAX_STOP_CHARS} characters, got {w!r:.60}")

    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise BadRequest(f"logit_bias must be an object of token id to bias, got {type(bias).__name__}")
        if vocab_size is not None and len(bias) > vocab_size:
            raise BadRequest(f"logit_bias: {len(bias)} entries for a vocabulary of {vocab_size}")
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise BadRequest(f"logit_bias keys must be token ids, got {key!r:.60}") from None
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                raise BadRequest(f"logit_bias: token id {token} outside the vocabulary [0, {vocab_size})")
            if not _is_number(value):
                raise BadRequest(f"logit_bias[{key}] must be a finite number, got {value!r:.60}")
    return body
