"""golem.runtime.analysis: offline tools over routing traces and model sizes.

Replays through eviction policies (``simulate``), the chunk statistic (``chunks``), warm-start
profiles (``profile``), the memory planner (``plan``) and the speed estimator (``estimate``).
Nothing here runs on the per-token path; the live runtime imports the planner and profiles.
"""
