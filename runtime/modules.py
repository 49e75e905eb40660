"""The modules golem puts into an mlx-lm model in place of its own: the experts module that
computes over slot pools, and the tap that keeps each MoE layer's residual for the predictor.

Owns only the call signatures the model sees; the work is the engine's
(``golem.runtime.engine``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class ResidualTap(nn.Module):
    """Stands where a decoder layer's pre-MoE norm stood; remembers its input (lazily).

    The residual stream after attention is what router lookahead feeds to the next
    layers' routers. Keeping a reference costs no evaluation and no host sync.

    Args:
        norm: the layer's own ``post_attention_layernorm``.
        store: dict the residual goes into, keyed by ``layer``.
        layer: the decoder layer number.
    """

    def __init__(self, norm: nn.Module, store: dict, layer: int):
        super().__init__()
        self.norm = norm
        self.layer = layer
        object.__setattr__(self, "_store", store)  # a plain dict, not a child of the module tree

    def __call__(self, x: mx.array) -> mx.array:
        self._store[self.layer] = x
        return self.norm(x)


class OffloadedExperts(nn.Module):
    """Stands where the model's ``SwitchGLU`` stood; same call, experts from slots.

    Args:
        glu: the model's own experts module, whose stacked arrays are now slot pools.
        layer: the decoder layer number.
        engine: the engine that resolves ids to slots.
    """

    def __init__(self, glu: nn.Module, layer: int, engine):
        super().__init__()
        self.glu = glu
        self.layer = layer
        self.engine = engine

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self.engine.forward(self.layer, self.glu, x, indices)
