"""The offloaded model ``load_offloaded`` returns: the mlx-lm model, its engine, and the
lifetime of what the runtime started for it.

Owns what a loaded model can be asked after loading: its statistics, saving the recorded
trace and the routing profile, and closing its I/O threads and files (and, on a pipeline
rank, telling the other ranks). Knows nothing of how it was built (``golem.runtime.loader``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.nn as nn

from golem.io.index import ExpertIndex

from golem.runtime.checkpoint import ExpertsModule, top_k_of
from golem.runtime.config import ConfigError, RuntimeConfig
from golem.runtime.disk_reader import DiskReader
from golem.runtime.engine import Engine


@dataclass
class OffloadedModel:
    """What ``load_offloaded`` builds: the model, its engine, and where memory went.

    ``options`` is the ``RuntimeConfig`` it was loaded with, ``plan`` the memory plan (None
    when slots were given outright) and ``sizing_note`` one line saying how it was sized.
    """

    model: nn.Module
    config: dict
    path: Path
    engine: Engine
    index: ExpertIndex
    experts: List[ExpertsModule]
    reader: DiskReader
    non_expert_nbytes: int = 0
    options: Optional[RuntimeConfig] = None
    plan: object = None
    sizing_note: Optional[str] = None
    model_path: Optional[str] = None
    pipeline: object = None  # golem.runtime.pipeline.Pipeline when this process is one stage
    watchdog: object = None  # golem.runtime.pipeline.Watchdog: a lost rank ends this one
    _closed: bool = field(default=False, repr=False)
    _finished: bool = field(default=False, repr=False)
    _finalizer: object = field(default=None, repr=False)

    @property
    def num_experts(self) -> int:
        return self.index.num_experts(self.experts[0].layer)

    @property
    def top_k(self) -> int:
        return top_k_of(self.config)

    def stats(self):
        """The expert figures since load (or ``reset_stats``): ``golem.runtime.report.ExpertStats``
        (hits, misses, bytes read, stall, prefetch, residency; per layer and in total)."""
        from golem.runtime.report import stats

        return stats(self)

    def reset_stats(self) -> None:
        """Count ``stats()`` from zero again (the engine's counters keep running)."""
        from golem.runtime.report import reset_stats

        reset_stats(self)

    def save_trace(self, path=None) -> Optional[Path]:
        """Write the recorded routing to ``path`` (default: the ``trace_out`` option)."""
        path = path if path is not None else (self.options.trace_out if self.options else None)
        if path is None:
            return None
        if self.engine.trace is None:
            raise ConfigError("no trace recorded: load with record=True or trace_out=PATH")
        self.engine.trace.save(path, what="--trace-out", protected=[self.path])
        return Path(path)

    def save_profile(self) -> Path:
        """Merge this run's routing (decode steps) into the model's saved profile."""
        from golem.runtime.profiles import model_identity, profile_from_traces, record_profile

        from golem.runtime.sizing import profile_dir

        if self.engine.trace is None:
            raise ConfigError("no routing recorded to profile: load with save_profile=True or record=True")
        policy = self.options.policy if self.options else "lru"
        policies = [policy] if policy != "lru" else []  # LRU's curve comes from the stack histogram
        run = profile_from_traces([self.engine.trace.trace()], policies=policies)
        run.meta["model"] = model_identity(self.path)
        return record_profile(profile_dir(self.model_path or self.path), run)

    def finish(self) -> dict:
        """Write what the options asked to keep (``trace_out``, ``save_profile``); returns
        ``{"trace": path, "profile": path}`` for what was written."""
        out = {}
        if self.options is not None and not self._closed and not self._finished:
            self._finished = True
            wanted = [what for what, on in (("trace_out", self.options.trace_out is not None),
                                            ("save_profile", self.options.save_profile)) if on]
            if wanted and (self.engine.trace is None or self.engine.trace.num_rows == 0):
                import warnings

                # A model that generated nothing is valid: there is nothing to keep, and no file is touched.
                warnings.warn(f"golem: nothing was generated, so {' and '.join(wanted)} wrote nothing",
                              RuntimeWarning, stacklevel=3)
                return out
            if self.options.trace_out is not None:
                out["trace"] = self.save_trace()
            recorded = self.engine.trace is None or self.engine.trace.num_steps > 0
            if self.options.save_profile and recorded:  # loaded, nothing generated: nothing to merge
                out["profile"] = self.save_profile()
        return out

    def release_on_drop(self, finalizer) -> None:
        """``finalizer`` (a ``weakref.finalize``) releases the runtime if the model is dropped
        unclosed; ``close`` detaches it."""
        self._finalizer = finalizer

    def close(self, *, failed: bool = False) -> None:
        """Stop the I/O threads and close the files; with a pipeline, also tell the other
        ranks this one finished (unless ``failed``: its silence then ends them)."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        if self.watchdog is not None:
            self.watchdog.close(failed=failed)
        self.engine.close()
        self.reader.close()
