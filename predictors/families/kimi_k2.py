"""``kimi_k2``: a DeepSeek-V3 model under another name (mlx-lm runs it as ``deepseek_v3``)."""

from .deepseek_v3 import FAMILY  # noqa: F401
