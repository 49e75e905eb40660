"""golem.io: where expert bytes come from.

Owns the safetensors expert index (``index``, ``ranges``), positioned reads into
caller-provided buffers (``reads``), the storage emulator (``storage``) and the I/O
scheduler (``scheduler``, with one module per job: ``settings``, ``dispatcher``,
``reader_pool``, ``loop_thread``, ``requests``, ``readers``, ``staging``, ``statistics``,
``futures``). Knows nothing of models, routers or predictors: it speaks of
files, byte ranges and expert keys ``(layer, expert)`` only.
"""
