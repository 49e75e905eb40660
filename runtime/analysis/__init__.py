"""golem.runtime.analysis: offline tools over routing traces and model sizes.

Replays through eviction policies (``simulate``), the chunk statistic (``chunks``), what a
model golem has not opened weighs (``model_size``), routing statistics measured on traces
(``plan``), machines as memory tiers (``machines``), the planner's plan on a machine
(``placement``) and the speed estimators (``estimate``), with built-in models and machines in
``catalog``. Nothing here runs when a model loads or generates: the memory plan and the
profiles it reads are the live runtime's (``golem.runtime.memplan``, ``golem.runtime.profiles``;
``plan`` and ``profile`` here re-export them). Building a profile from traces (``-W TRACE``,
``--save-profile`` when a model closes) replays through ``simulate``.
"""
