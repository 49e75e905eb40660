"""golem.runtime: composes the expert index, the I/O scheduler and the predictors into an
offloaded MoE model that mlx-lm's own generation code drives unchanged.
"""
