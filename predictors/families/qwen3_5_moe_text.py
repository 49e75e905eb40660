"""``qwen3_5_moe_text``: the language model inside a ``qwen3_5_moe`` one."""

from .qwen3_5_moe import FAMILY  # noqa: F401
