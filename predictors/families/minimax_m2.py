"""``minimax_m2``: the model type MiniMax-M2 checkpoints carry (mlx-lm runs it as ``minimax``)."""

from .minimax import FAMILY  # noqa: F401
