"""golem.io: where expert bytes come from.

Owns the safetensors expert index, positioned reads into caller-provided buffers, and
the asyncio I/O scheduler. Knows nothing of models, routers or predictors: it speaks of
files, byte ranges and expert keys ``(layer, expert)`` only.
"""
