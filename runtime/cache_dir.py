"""What golem keeps in its cache folder (``$GOLEM_CACHE``, else ``~/.cache/golem``), listed
and removed safely.

Owns the folder's inventory: generated checkpoints (``golem-run --demo``'s and the
benchmarks'), the ones a builder that died left half-written, saved warm-start profiles
(with damaged files set aside and temporary files of writers that died), and the lock files
that keep concurrent builders and writers apart. Removal takes each thing's own lock first,
without waiting: what another process is building or writing right now is kept and reported,
never pulled from under it. Knows nothing of models or routing; files it does not recognise
are listed and never removed.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Union

from golem.runtime.analysis.profile import PROFILE_FILENAME
from golem.runtime.synthetic import default_cache_dir

LOCK_SUFFIX = ".lock"
PARTIAL_MARK = ".partial-"  # build_checkpoint's temporary folders: <name>.partial-XXXX
PROFILES = "profiles"

# What --remove names, and the entry kinds each name covers.
GROUPS = {
    "checkpoints": ("checkpoint", "partial checkpoint"),
    "profiles": ("profile", "damaged profile", "temporary"),
    "locks": ("lock",),
}
GROUPS["all"] = tuple(k for kinds in GROUPS.values() for k in kinds)


@dataclass(frozen=True)
class CacheEntry:
    """One thing in golem's cache folder.

    Args:
        kind: ``checkpoint``, ``partial checkpoint``, ``profile``, ``damaged profile``,
            ``temporary``, ``lock`` or ``other`` (not golem's: never removed).
        path: where it is.
        nbytes: bytes on disk (a folder: every file in it).
        mtime: last modification, seconds since the epoch.
        detail: a few words (a checkpoint's model type, a profile's model and runs).
        guard: the lock file that guards it (removal takes this lock first), if any.
    """

    kind: str
    path: Path
    nbytes: int
    mtime: float
    detail: str = ""
    guard: Optional[Path] = None

    def to_dict(self, root: Path) -> dict:
        return {"kind": self.kind, "path": _relative(self.path, root), "nbytes": self.nbytes,
                "modified": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.mtime)),
                "detail": self.detail}


@dataclass
class Removal:
    """What ``remove`` did: entries removed, entries kept because another process holds their
    lock, and the bytes freed."""

    removed: List[CacheEntry] = field(default_factory=list)
    busy: List[CacheEntry] = field(default_factory=list)

    @property
    def freed_nbytes(self) -> int:
        return sum(e.nbytes for e in self.removed)


def cache_root(root: Union[str, os.PathLike, None] = None) -> Path:
    """``root``, else golem's cache folder (``GOLEM_CACHE``, else ``~/.cache/golem``)."""
    return Path(root) if root is not None else default_cache_dir()


def list_cache(root: Union[str, os.PathLike, None] = None) -> List[CacheEntry]:
    """Every entry of golem's cache folder, checkpoints first, then profiles, then locks
    (an absent folder has none). Reads only names, sizes and the profiles' small headers."""
    root = cache_root(root)
    if not root.is_dir():
        return []
    entries: List[CacheEntry] = []
    for path in sorted(root.iterdir()):
        if path.name == PROFILES and path.is_dir():
            entries += _profiles(path)
        elif path.name.endswith(LOCK_SUFFIX) and path.is_file():
            entries.append(_entry("lock", path))
        elif PARTIAL_MARK in path.name and path.is_dir():
            base = path.name.split(PARTIAL_MARK)[0]
            entries.append(_entry("partial checkpoint", path, "left by a build that did not finish",
                                  guard=root / (base + LOCK_SUFFIX)))
        elif path.is_dir() and (path / "config.json").is_file():
            entries.append(_entry("checkpoint", path, _model_type(path), guard=root / (path.name + LOCK_SUFFIX)))
        else:
            entries.append(_entry("other", path, "not golem's: left alone"))
    order = {"checkpoint": 0, "partial checkpoint": 1, "profile": 2, "damaged profile": 3, "temporary": 4,
             "lock": 5, "other": 6}
    return sorted(entries, key=lambda e: (order[e.kind], str(e.path)))


def kinds_of(names: Union[str, Iterable[str]]) -> tuple:
    """The entry kinds ``--remove`` names cover (``"checkpoints,locks"``; ``"all"``)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise ValueError(f"--remove: unknown {', '.join(map(repr, unknown)) or 'nothing named'}; "
                         f"name one or more of {', '.join(GROUPS)} (comma-separated)")
    return tuple(dict.fromkeys(k for n in names for k in GROUPS[n]))


def remove(entries: Iterable[CacheEntry], kinds: Iterable[str], root: Union[str, os.PathLike, None] = None) -> Removal:
    """Remove the ``entries`` of ``kinds``; locks last, and only those nobody holds.

    Each checkpoint and profile is removed while holding its own lock, taken without
    waiting: one another process holds (a build or a profile update under way) is kept and
    listed in ``busy``. A lock file is removed while held by us, so nobody is inside what it
    guards. Profile folders left empty are removed, and the cache folder itself when nothing
    is left in it. ``other`` entries are never removed.
    """
    from filelock import FileLock, Timeout

    root = cache_root(root)
    kinds = set(kinds) - {"other"}
    chosen = [e for e in entries if e.kind in kinds]
    done = Removal()
    for entry in sorted(chosen, key=lambda e: e.kind == "lock"):  # what locks guard, before the locks
        guard = entry.path if entry.kind == "lock" else entry.guard
        lock = FileLock(str(guard), timeout=0) if guard is not None and (entry.kind == "lock" or guard.exists()) else None
        try:
            if lock is not None:
                lock.acquire()
        except Timeout:
            done.busy.append(entry)
            continue
        try:
            if entry.path.is_dir() and not entry.path.is_symlink():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink(missing_ok=True)
            done.removed.append(entry)
        finally:
            if lock is not None:
                lock.release()
    profiles = root / PROFILES
    if profiles.is_dir():
        for folder in profiles.iterdir():
            _remove_if_empty(folder)
        _remove_if_empty(profiles)
    _remove_if_empty(root)
    return done


def describe_entry(entry: CacheEntry, root: Path) -> str:
    from golem.runtime.units import format_nbytes

    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.mtime))
    detail = f"  ({entry.detail})" if entry.detail else ""
    return f"{entry.kind:<18} {format_nbytes(entry.nbytes):>10}  {when}  {_relative(entry.path, root)}{detail}"


# -- helpers --------------------------------------------------------------------------------


def _profiles(folder: Path) -> List[CacheEntry]:
    out = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.name
        guard = path.with_name(PROFILE_FILENAME + LOCK_SUFFIX)
        if name == PROFILE_FILENAME:
            out.append(_entry("profile", path, _profile_detail(path), guard=guard))
        elif name.endswith(LOCK_SUFFIX):
            out.append(_entry("lock", path))
        elif name.startswith(PROFILE_FILENAME + ".damaged-"):
            out.append(_entry("damaged profile", path, "set aside: unreadable", guard=guard))
        elif name.startswith((PROFILE_FILENAME + ".", "." + PROFILE_FILENAME + ".")) and name.endswith(".tmp"):
            out.append(_entry("temporary", path, "left by a writer that did not finish", guard=guard))
        else:
            out.append(_entry("other", path, "not golem's: left alone"))
    return out


def _entry(kind: str, path: Path, detail: str = "", guard: Optional[Path] = None) -> CacheEntry:
    nbytes, mtime = 0, 0.0
    try:
        st = path.lstat()
        mtime = st.st_mtime
        if path.is_dir() and not path.is_symlink():
            for dirpath, _, files in os.walk(path):
                for f in files:
                    try:
                        nbytes += os.lstat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        pass
        else:
            nbytes = st.st_size
    except OSError:
        pass
    return CacheEntry(kind, path, nbytes, mtime, detail, guard)


def _model_type(path: Path) -> str:
    import json

    try:
        return f"generated {json.loads((path / 'config.json').read_text()).get('model_type', '?')} model"
    except (OSError, ValueError, AttributeError):
        return "config.json unreadable"


def _profile_detail(path: Path) -> str:
    import json

    try:
        data = json.loads(path.read_text())
        model = (data.get("meta") or {}).get("model") or "unnamed model"
        runs = data.get("runs", "?")
        return f"{model}, {runs} run{'' if runs == 1 else 's'}"
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass
