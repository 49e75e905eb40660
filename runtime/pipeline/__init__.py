"""Pipeline parallelism on ``mx.distributed``: an offloaded model split across ranks.

``split`` (which layers and tensors each rank owns), ``collectives`` (golem's collectives,
a lost peer as one error), ``statistics`` (one table, a column per rank), ``boundary``
(prefetch across ranks), ``watchdog`` (a lost rank ends every rank), ``local`` (ranks on this
machine). Knows nothing of slots or reads; ``golem.runtime.loader`` composes it.
"""

from golem.runtime.pipeline.boundary import Boundary, connect_boundaries
from golem.runtime.pipeline.collectives import (PeerLostError, barrier, common_seed, gather, init_group, is_peer_loss,
                                                lost_message, peer_errors, peer_lost_line, rank_zero_stdout, settle)
from golem.runtime.pipeline.local import free_ports, launch_local
from golem.runtime.pipeline.split import (LAYER_OF_TENSOR, SPLIT_MODES, Pipeline, PipelineConfig, PipelineError, apply,
                                          balanced_partition, layer_nbytes, local_config, parse_split, per_rank,
                                          pipeline_config, plan_split, supports_pipeline)
from golem.runtime.pipeline.statistics import RANK_FIELDS, format_rank_table, gather_statistics, rank_statistics
from golem.runtime.pipeline.watchdog import Watchdog, ring_hosts, start_watchdog

__all__ = [
    "Boundary", "LAYER_OF_TENSOR", "PeerLostError", "Pipeline", "PipelineConfig", "PipelineError", "RANK_FIELDS",
    "SPLIT_MODES", "Watchdog", "apply", "balanced_partition", "barrier", "common_seed", "connect_boundaries",
    "format_rank_table", "free_ports", "gather", "gather_statistics", "init_group", "is_peer_loss", "launch_local",
    "layer_nbytes", "local_config", "lost_message", "parse_split", "peer_errors", "peer_lost_line", "per_rank",
    "pipeline_config", "plan_split", "rank_statistics", "rank_zero_stdout", "ring_hosts", "settle",
    "start_watchdog", "supports_pipeline",
]
