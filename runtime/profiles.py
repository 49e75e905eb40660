"""Warm-start profiles: how often each expert of each MoE layer was used, saved as a small JSON
file, and the warm starts built from them (top-N experts per layer by frequency, or random).

Owns the profile format (golem-profile/1), building profiles from traces, the profile store
kept beside golem's cache (one folder per model, found by the model's resolved path; updates
merged under a file lock and written atomically, a damaged file set aside rather than fatal),
and warm-start lists in insertion order. Loading a model reads profiles here; only building
one from traces (``-W TRACE``, ``--save-profile``) uses the replay tools of
``golem.runtime.analysis.simulate`` (stack distances, miss curves).
Knows nothing of slots, bytes or MLX; the runtime decides when to load or record one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from golem.runtime.trace import TraceError, load_traces

if TYPE_CHECKING:
    from golem.runtime.analysis.simulate import Traces

PROFILE_FORMAT = "golem-profile/1"
PROFILE_FILENAME = "golem-profile.json"
LOCK_TIMEOUT_S = 60.0
MAX_EXPERTS = 1 << 20  # a sanity bound on files read back

log = logging.getLogger(__name__)


class ProfileError(ValueError):
    """A profile file that is missing, malformed, or made for another model shape."""


class ProfileDamaged(ProfileError):
    """A profile file that is not valid JSON or not a well-formed profile (cut short, garbled)."""


@dataclass
class Profile:
    """Routing frequencies per MoE layer, gathered over one or more runs.

    Args:
        counts: float64 (L, E), uses of each expert in decode steps (merged runs may be
            decayed, hence floats).
        top_k: experts per token of the model.
        num_steps: decode steps counted.
        runs: how many runs or traces were merged into it.
        stack_hist: optional int64 (L, E+1), plain LRU's stack-distance histogram (see
            ``golem.runtime.analysis.simulate.stack_distance_histogram``), which the memory planner
            turns into per-layer miss curves.
        stack_steps: decode steps ``stack_hist`` covers (default ``num_steps``; fewer when
            runs without a histogram were merged in).
        meta: free-form facts (model name, sources).
        curves: policy spec -> (steps, float (L, E+1) misses with 0..E slots over those
            steps), from ``golem.runtime.analysis.simulate.miss_curve``; the planner prefers these
            to LRU's stack distances for the policy that runs.
    """

    counts: np.ndarray
    top_k: int
    num_steps: int = 0
    runs: int = 1
    stack_hist: Optional[np.ndarray] = None
    stack_steps: Optional[int] = None
    meta: dict = field(default_factory=dict)
    curves: Dict[str, Tuple[int, np.ndarray]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def hist_steps(self) -> int:
        """Decode steps the stack-distance histogram covers (0 without one)."""
        if self.stack_hist is None:
            return 0
        return self.num_steps if self.stack_steps is None else int(self.stack_steps)

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    def top_experts(self, position: int, n: Optional[int] = None) -> list[int]:
        """The used experts of the MoE layer at ``position`` (0..L-1), most used first (ties:
        lower id first), at most ``n``."""
        c = self.counts[position]
        order = np.lexsort((np.arange(len(c)), -c))
        order = order[c[order] > 0]
        return [int(e) for e in (order if n is None else order[:n])]

    def warm_start(self, cache_size: Union[int, Sequence[int]], pinned: Sequence[int] = ()) -> Dict[int, list]:
        """MoE layer position -> the ``cache_size`` most used experts in insertion order: the
        most used last, so that it ends most recent. Pinned positions are left out."""
        sizes = _per_layer(cache_size, self.num_layers)
        skip = set(pinned)
        return {
            position: self.top_experts(position, sizes[position])[::-1]
            for position in range(self.num_layers)
            if position not in skip
        }

    def check_shape(self, num_layers: int, num_experts: int, where: str = "profile", other: str = "the model") -> None:
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise ProfileError(
                f"{where}: made for {self.num_layers} layers x {self.num_experts} experts, "
                f"{other} has {num_layers} x {num_experts}"
            )

    def merge(self, other: "Profile", decay: float = 1.0) -> "Profile":
        """This profile's counts times ``decay`` plus ``other``'s (older runs fade when < 1)."""
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        other.check_shape(self.num_layers, self.num_experts, "merged run", "the profile")
        hists = [p.stack_hist for p in (self, other) if p.stack_hist is not None]
        hist = sum(hists[1:], hists[0].copy()) if hists else None
        curves = dict(self.curves)
        for spec, (steps, misses) in other.curves.items():
            if spec in curves:
                curves[spec] = (curves[spec][0] + steps, curves[spec][1] + misses)
            else:
                curves[spec] = (steps, misses)
        return Profile(
            counts=self.counts * decay + other.counts,
            top_k=other.top_k,
            num_steps=self.num_steps + other.num_steps,
            runs=self.runs + other.runs,
            stack_hist=hist,
            stack_steps=self.hist_steps + other.hist_steps if hist is not None else None,
            meta={**self.meta, **other.meta},
            curves=curves,
        )

    def to_json(self) -> dict:
        layers = []
        for position in range(self.num_layers):
            top = self.top_experts(position)
            layers.append({"experts": top, "counts": [_number(self.counts[position, e]) for e in top]})
        out = {
            "format": PROFILE_FORMAT,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_steps": self.num_steps,
            "runs": self.runs,
            "meta": self.meta,
            "layers": layers,
        }
        if self.stack_hist is not None:
            out["stack_hist"] = self.stack_hist.tolist()
            out["stack_steps"] = self.hist_steps
        if self.curves:
            out["curves"] = {
                spec: {"steps": int(steps), "misses": np.round(misses, 3).tolist()}
                for spec, (steps, misses) in self.curves.items()
            }
        return out

    @classmethod
    def from_json(cls, data: dict, where: str = "profile") -> "Profile":
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            foreign = isinstance(found, str) and isinstance(data, dict)
            raise (ProfileError if foreign else ProfileDamaged)(f"{where}: not a {PROFILE_FORMAT} file (format {found!r})")
        try:
            num_layers, num_experts = int(data["num_layers"]), int(data["num_experts"])
            layers = data["layers"]
            if not (0 < num_layers and 0 < num_experts <= MAX_EXPERTS) or not isinstance(layers, list):
                raise ProfileDamaged(f"{where}: {num_layers} layers x {num_experts} experts is not a model shape")
            if len(layers) != num_layers:
                raise ProfileDamaged(f"{where}: {len(layers)} layer entries, num_layers says {num_layers}")
            counts = np.zeros((num_layers, num_experts), dtype=np.float64)
            for position, entry in enumerate(layers):
                experts, values = entry["experts"], entry["counts"]
                if len(experts) != len(values):
                    raise ProfileDamaged(
                        f"{where}: layer {position} lists {len(experts)} experts but {len(values)} counts")
                for e, c in zip(experts, values):
                    if not 0 <= int(e) < num_experts:
                        raise ProfileDamaged(f"{where}: layer {position} names expert {e}, outside [0, {num_experts})")
                    if not float(c) >= 0 or math.isinf(float(c)):
                        raise ProfileDamaged(f"{where}: layer {position} expert {e} has a count of {c}")
                    counts[position, int(e)] = float(c)
            hist = None
            if "stack_hist" in data:
                hist = np.asarray(data["stack_hist"], dtype=np.int64)
                if hist.shape != (num_layers, num_experts + 1):
                    raise ProfileDamaged(f"{where}: stack_hist shape {hist.shape}, expected {(num_layers, num_experts + 1)}")
            curves = {}
            for spec, entry in (data.get("curves") or {}).items():
                misses = np.asarray(entry["misses"], dtype=np.float64)
                if misses.shape != (num_layers, num_experts + 1):
                    raise ProfileDamaged(f"{where}: curves of {spec!r} have shape {misses.shape}, "
                                         f"expected {(num_layers, num_experts + 1)}")
                curves[str(spec)] = (int(entry["steps"]), misses)
            return cls(
                counts=counts,
                top_k=int(data["top_k"]),
                num_steps=int(data.get("num_steps", 0)),
                runs=int(data.get("runs", 1)),
                stack_hist=hist,
                stack_steps=int(data["stack_steps"]) if "stack_steps" in data else None,
                meta=dict(data.get("meta") or {}),
                curves=curves,
            )
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ProfileDamaged(f"{where}: malformed profile ({type(e).__name__}: {e})") from None


def _number(x: float):
    x = float(x)
    return int(x) if x.is_integer() else round(x, 4)


def _per_layer(cache_size, num_layers: int) -> list[int]:
    if isinstance(cache_size, (int, np.integer)):
        return [int(cache_size)] * num_layers
    sizes = [int(c) for c in cache_size]
    if len(sizes) != num_layers:
        raise ValueError(f"cache_size: {len(sizes)} per-layer values for {num_layers} layers")
    return sizes


def profile_from_counts(counts, *, top_k: int, num_steps: int, meta: Optional[dict] = None) -> Profile:
    """A one-run profile from routing counts (L, E), e.g. those a finished run gathered."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"routing counts must be (layers, experts), got shape {counts.shape}")
    if (counts < 0).any():
        raise ValueError("routing counts must not be negative")
    return Profile(counts=counts, top_k=int(top_k), num_steps=int(num_steps), runs=1, meta=dict(meta or {}))


def profile_from_traces(
    traces: Traces, *, decode_only: bool = True, stack: bool = True, policies: Sequence[str] = ()
) -> Profile:
    """Count every (layer, expert) use of the traces' decode steps; ``stack`` adds the LRU
    stack-distance histogram the planner uses, ``policies`` the miss curves of those
    policies (about 16 replays each); caches persist across the traces."""
    from golem.runtime.analysis.simulate import as_trace_list, miss_curve, stack_distance_histogram

    trace_list = as_trace_list(traces)
    first = trace_list[0]
    num_layers, num_experts = first.num_layers, first.num_experts
    counts = np.zeros((num_layers, num_experts), dtype=np.float64)
    steps = 0
    for t in trace_list:
        t = t.decode_only() if decode_only else t
        ex = t.experts.astype(np.int64)
        ok = ex >= 0
        flat = (np.arange(num_layers)[None, :, None] * num_experts + ex)[ok]
        counts += np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)
        steps += t.num_steps
    sources = [Path(t.path).name for t in trace_list if t.path]
    meta = {"model": first.meta.get("model"), "sources": sources} if first.meta.get("model") else {"sources": sources}
    return Profile(
        counts=counts,
        top_k=max(t.top_k for t in trace_list),
        num_steps=steps,
        runs=len(trace_list),
        stack_hist=stack_distance_histogram(trace_list, decode_only=decode_only) if stack else None,
        meta=meta,
        curves={p: (steps, miss_curve(trace_list, p, decode_only=decode_only)) for p in policies},
    )


def save_profile(profile: Profile, path: Union[str, Path]) -> Path:
    """Write ``profile`` as JSON: under the file's lock, into a temporary file of its own,
    synced, then renamed over ``path`` (a reader sees the old file or the new, never a part)."""
    path = Path(path)
    with _locked(path):
        _write_atomic(profile, path)
    return path


def load_profile(path: Union[str, Path]) -> Profile:
    """The profile in ``path``; ``ProfileDamaged`` when the file is cut short or garbled."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProfileDamaged(f"{path}: cannot read profile: {e}") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read profile: {e.strerror or e}") from None
    return Profile.from_json(data, where=str(path))


def load_warm_source(path: Union[str, Path], *, decode_only: bool = True) -> Profile:
    """A profile from what ``-W/--warm-start PATH`` names: a trace (``.npz``), a folder of
    traces, a folder holding a saved profile (``golem-profile.json``), or a profile file."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*.npz")):
            return profile_from_traces(load_traces([path]), decode_only=decode_only)
        if (path / PROFILE_FILENAME).is_file():
            return load_profile(path / PROFILE_FILENAME)
        raise ProfileError(f"{path}: folder holds neither .npz traces nor {PROFILE_FILENAME}")
    if not path.exists():
        raise ProfileError(f"{path}: no such trace, folder or profile")
    if path.suffix == ".npz":
        try:
            return profile_from_traces(load_traces([path]), decode_only=decode_only)
        except TraceError as e:
            raise ProfileError(str(e)) from None
    return load_profile(path)


def random_warm_start(
    seed: int, num_layers: int, num_experts: int, cache_size: Union[int, Sequence[int]], pinned: Sequence[int] = ()
) -> Dict[int, list]:
    """MoE layer position -> ``cache_size`` distinct experts drawn at random
    (``-R/--warm-random SEED``).

    Every layer gets its own draw from one generator seeded with ``seed``, so the same seed
    gives the same warm start; pinned positions are left out.
    """
    sizes = _per_layer(cache_size, num_layers)
    rng = np.random.default_rng(seed)
    skip = set(pinned)
    out: Dict[int, list] = {}
    for position in range(num_layers):
        draw = rng.permutation(num_experts)[: min(sizes[position], num_experts)]
        if position not in skip:
            out[position] = [int(e) for e in draw]
    return out


def profile_path(folder: Union[str, Path]) -> Path:
    """Where golem keeps the profile beside its cache."""
    return Path(folder) / PROFILE_FILENAME


def model_identity(model_path: Union[str, Path]) -> str:
    """Which model a path names, for the profile store: a local folder by its resolved path
    (relative, absolute and symlinked paths to one folder are one model), a Hugging Face
    cache snapshot (``.../models--org--name/snapshots/<rev>``) and a repo id by ``org/name``."""
    local = Path(model_path).expanduser()
    if not local.exists():
        return str(model_path)
    resolved = local.resolve()
    repo = resolved.parent.parent.name
    if resolved.parent.name == "snapshots" and repo.startswith("models--"):
        return "/".join(repo.split("--")[1:])
    return str(resolved)


def same_model(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two recorded model names are one model (unnamed matches anything)."""
    return not a or not b or a == b or model_identity(a) == model_identity(b)


def profile_dir_for(model_path: Union[str, Path], cache_dir: Union[str, Path, None] = None) -> Path:
    """The folder of ``model_path``'s saved profile: ``<cache>/profiles/<name>``, named after
    the model folder (or ``org--name`` for the hub), with a short hash of the model's identity
    appended when another model of the same name already holds that folder.

    Args:
        model_path: a local model folder (any spelling of it) or a Hugging Face repo id.
        cache_dir: golem's cache folder (default ``golem.runtime.synthetic.default_cache_dir()``).
    """
    if cache_dir is None:
        from golem.runtime.synthetic import default_cache_dir

        cache_dir = default_cache_dir()
    identity = model_identity(model_path)
    name = Path(identity).name if os.path.isabs(identity) else identity.replace("/", "--")
    root = Path(cache_dir) / "profiles"
    plain, hashed = root / name, root / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"
    if profile_path(hashed).exists():
        return hashed
    try:
        owner = load_profile(profile_path(plain)).meta.get("model")
    except ProfileError:
        owner = None  # absent or damaged: recording sets a damaged one aside
    return plain if same_model(owner, identity) else hashed


def load_saved_profile(folder: Union[str, Path]) -> Optional[Profile]:
    """The profile saved in ``folder`` (``None`` when there is none). A damaged file is set
    aside (renamed ``*.damaged-<time>``, with a logged warning) and ``None`` returned."""
    path = profile_path(folder)
    if not path.is_file():
        return None
    try:
        return load_profile(path)
    except ProfileDamaged:
        pass
    with _locked(path):
        return _load_or_set_aside(path)


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``'s updates (``<path>.lock``; released if the holder dies)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise ProfileError(f"{path}: another process held its lock for {LOCK_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise ProfileError(f"{path.parent}: cannot write a profile there ({e.strerror or e})") from None
    try:
        yield
    finally:
        lock.release()


def _write_atomic(profile: Profile, path: Path) -> None:
    """Write into a unique temporary file beside ``path``, fsync it, rename it over ``path``
    (``golem.io.outputs``); never into the profiled model's own folder."""
    from golem.io.outputs import OutputError, write_output

    text = json.dumps(profile.to_json(), separators=(",", ":")) + "\n"
    model = profile.meta.get("model")
    protected = [model] if isinstance(model, str) and os.path.isabs(model) else []
    try:
        write_output(path, lambda f: f.write(text.encode()), what="--save-profile", protected=protected)
    except OutputError as e:
        raise ProfileError(str(e)) from None


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of writers that died mid-write (only called under the lock, when no
    other writer can be writing one)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass


def _load_or_set_aside(path: Path) -> Optional[Profile]:
    """Under the lock: the profile in ``path``, or ``None`` when absent or damaged (set aside)."""
    if not os.path.lexists(path):
        return None
    try:
        if not path.is_file():
            raise ProfileDamaged(f"{path}: not a regular file")
        return load_profile(path)
    except ProfileDamaged as e:
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        n = 1
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{n}")
        os.replace(path, aside)
        log.warning("golem: %s; set aside as %s, starting a new profile", e, aside.name)
        return None


def record_run(
    folder: Union[str, Path],
    counts,
    *,
    top_k: int,
    num_steps: int,
    stack_hist: Optional[np.ndarray] = None,
    curves: Optional[Mapping[str, np.ndarray]] = None,
    meta: Optional[dict] = None,
    decay: float = 1.0,
) -> Path:
    """Merge a finished run's routing counts (L, E) into ``folder/golem-profile.json``.

    ``stack_hist`` and ``curves`` (policy spec -> ``miss_curve`` of the run's trace) are
    what the planner reads back. Creates the folder and the file when absent; an existing
    profile's counts are multiplied by ``decay`` first (curves and histograms add up). A profile of another shape, or of another ``meta["model"]``, is an
    error (``ProfileError``) rather than silently mixed. Returns the file's path.
    """
    run = profile_from_counts(counts, top_k=top_k, num_steps=num_steps, meta=meta)
    if stack_hist is not None:
        run.stack_hist = np.asarray(stack_hist, dtype=np.int64)
        run.stack_steps = int(num_steps)
    for spec, misses in (curves or {}).items():
        misses = np.asarray(misses, dtype=np.float64)
        if misses.shape != (run.num_layers, run.num_experts + 1):
            raise ValueError(f"curves of {spec!r}: shape {misses.shape}, expected {(run.num_layers, run.num_experts + 1)}")
        run.curves[spec] = (int(num_steps), misses)
    return record_profile(folder, run, decay=decay)


def record_profile(folder: Union[str, Path], run: Profile, *, decay: float = 1.0) -> Path:
    """Merge a finished run's profile (e.g. ``profile_from_traces(run_trace, policies=[policy])``)
    into ``folder/golem-profile.json``, as ``record_run`` does; returns the file's path.

    Safe with any number of concurrent writers: the read-merge-write runs under the file's
    lock, and a writer killed at any point leaves the previous file whole. A damaged file
    is set aside (``*.damaged-<time>``, with a logged warning) and a new profile started.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProfileError(f"{folder}: cannot create the profile folder ({e.strerror or e})") from None
    path = profile_path(folder)
    with _locked(path):
        _remove_stale_temporaries(path)
        old = _load_or_set_aside(path)
        if old is not None:
            old.check_shape(run.num_layers, run.num_experts, str(path), "this run")
            a, b = old.meta.get("model"), run.meta.get("model")
            if not same_model(a, b):
                raise ProfileError(f"{path}: profile of model {a!r}, this run is {b!r}")
            run = old.merge(run, decay=decay)
        _write_atomic(run, path)
    return path
