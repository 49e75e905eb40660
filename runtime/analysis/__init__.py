"""golem.runtime.analysis: offline tools over routing traces and model sizes.

Replays through eviction policies (``simulate``), the chunk statistic (``chunks``), warm-start
profiles (``profile``), what a model weighs (``model_size``), the memory planner (``plan``),
machines as memory tiers (``machines``), the planner's plan on a machine (``placement``) and
the speed estimators (``estimate``), with built-in models and machines in ``catalog``.
Nothing here runs on the per-token path; the live runtime imports the planner and profiles.
"""
