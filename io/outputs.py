"""Files golem writes (traces, profiles, plots, JSON reports, caches): one rule for all.

The target must be a regular file or absent (never a folder, a symlink, a device, a pipe)
and must not lie in a protected folder (the model's), even through symlinks or hard links.
The bytes go to a unique temporary file in the target's folder, are flushed and fsynced,
then renamed over the target: a reader sees the old file or the new one, a full disk
leaves the old file as it was, and concurrent writers each finish (the last rename wins).
Knows nothing of what the bytes are or of models: callers name the folders to protect.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional, Set, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]


class OutputError(ValueError):
    """An output golem refuses to write, or could not write; the message names the path
    (and the flag that chose it) and says what was left in place."""


def _label(path: PathLike, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def _inodes(folder: Path) -> Set[Tuple[int, int]]:
    """``(device, inode)`` of every file in ``folder`` and of whatever its entries link to
    (a Hugging Face snapshot links each file to a blob elsewhere)."""
    out: Set[Tuple[int, int]] = set()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for entry in entries:
        try:
            st = os.stat(entry.path)  # follows the link to the blob
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out.add((st.st_dev, st.st_ino))
    return out


def check_output(path: PathLike, *, what: str = "", protected: Iterable[PathLike] = ()) -> Path:
    """The path to write ``path`` at, after refusing anything golem must not replace.

    Refused, with an ``OutputError`` naming ``what`` (e.g. ``"--trace-out"``) and the path:
    an existing target that is not a regular file (folder, symlink, device, pipe, socket);
    a target whose folder does not exist; a target inside one of the ``protected`` folders
    once every symlink is resolved, or one that is (a hard link to) a file of such a folder.

    Args:
        path: the file to write.
        what: the flag or option that named it, for messages.
        protected: folders golem never writes into (the model folder).
    """
    label = _label(path, what)
    p = Path(os.fspath(path)).expanduser()
    if not p.name or p.name in (".", ".."):
        raise OutputError(f"{label}: give a file name, not a folder")
    try:
        st: Optional[os.stat_result] = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{label}: cannot check the path ({e.strerror or e})") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{label}: is a symbolic link; golem replaces only regular files "
                              "(name the file it points to, or a new file)")
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{label}: is a folder; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{label}: is not a regular file (a device, pipe or socket); golem will not replace it")
    parent = p.parent
    if not parent.is_dir():
        raise OutputError(f"{label}: folder {parent} does not exist")
    target = check_outside(p, what=what, protected=protected)
    for root in protected:
        r = Path(os.fspath(root)).expanduser()
        if st is not None and r.is_dir() and (st.st_dev, st.st_ino) in _inodes(r):
            raise OutputError(f"{label}: is a file of the model folder {root} (a link to it); "
                              "golem never writes there")
    return target


def check_outside(path: PathLike, *, what: str = "", protected: Iterable[PathLike] = ()) -> Path:
    """``path`` with its symlinks resolved as far as it exists, after refusing one inside a
    ``protected`` folder (``OutputError``). The path need not exist yet (a folder golem
    would create): check it before creating anything."""
    label = _label(path, what)
    p = Path(os.path.abspath(Path(os.fspath(path)).expanduser()))
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    target = existing.resolve() / p.relative_to(existing)
    for root in protected:
        r = Path(os.fspath(root)).expanduser()
        if not r.is_dir():
            continue
        resolved = r.resolve()
        if resolved == target or resolved in target.parents:
            raise OutputError(f"{label}: is inside the model folder {root}; golem never writes there")
    return target


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_output(path: PathLike, write: Callable[[BinaryIO], None], *, what: str = "",
                 protected: Iterable[PathLike] = ()) -> Path:
    """Write a file atomically: ``write(f)`` fills a temporary file beside ``path``, which
    then replaces it. Returns the path written.

    A failure (a full disk, a quota, a refused path) is an ``OutputError`` naming the path
    and leaving the previous file untouched; the temporary file is removed. Any exception
    ``write`` raises is passed on, after that clean-up. The file gets the old file's
    permissions, or the usual ones (0666 less the umask) when new.

    Args:
        path: the file to write (checked with ``check_output``).
        write: fills a binary file object; may be called with a file that is not seekable
            to the end of anything but its own bytes.
        what: the flag or option that named it, for messages.
        protected: folders golem never writes into (the model folder).
    """
    protected = tuple(protected)
    label = _label(path, what)
    target = check_output(path, what=what, protected=protected)
    try:
        old_mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        old_mode = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"{label}: cannot write in {target.parent} ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, old_mode if old_mode is not None else 0o666 & ~_umask())
        check_output(path, what=what, protected=protected)  # replaced by a link meanwhile?
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            kept = "the old file is left as it was" if old_mode is not None else "nothing was written"
            raise OutputError(f"{label}: cannot write ({e.strerror or e}); {kept}") from None
        raise
    try:  # the rename itself survives a power cut once the folder is synced
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return target


def write_bytes_output(path: PathLike, data: bytes, **kwargs) -> Path:
    """``write_output`` of ``data`` as it is."""
    return write_output(path, lambda f: f.write(data), **kwargs)
