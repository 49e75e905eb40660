"""golem.io: where expert bytes come from.

Owns the safetensors expert index (``index``, ``ranges``), positioned reads into
caller-provided buffers (``positioned_reads``, through the held handles of ``file_handles``,
failing with ``read_errors``), the page-cache tools of benchmarks (``page_cache``), the
storage emulator (``storage``) and the I/O scheduler (``scheduler``, with one module per
job: ``settings``, ``dispatcher``, ``reader_pool``, ``loop_thread``, ``requests``,
``read_jobs``, ``staging``, ``statistics``, ``futures``). Knows nothing of models, routers
or predictors: it speaks of files, byte ranges and expert keys ``(layer, expert)`` only.
"""
