"""Atomic writes: a reader (or a resumed run, or another sweep trial) sees the old file or folder or
the new one, never half of one. The one implementation behind results.json, snapshots, the
teacher cache and the stage cache.

Written by hand (``tempfile`` + ``os.replace``/``os.rename`` + ``fsync``): the standard library
gives exactly the primitives needed, and their semantics are the operating system's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep a shared results folder from others
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask: read from /proc on Linux (setting it to read it would race other threads'
    files), else by setting it and back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    """Every file and folder under ``root`` on disk, before ``root`` is renamed into place: a folder
    trusted for its name (the teacher cache's ``COMPLETE``) must not hold empty files after a power loss."""
    for path in sorted(root.rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_symlink():
            continue
        if path.is_dir():
            fsync_dir(path)
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(root)


def write_json_atomic(path: Path, payload: Any) -> None:
    """JSON through :func:`write_file_atomic` (results.json, manifests, run.json)."""
    write_file_atomic(path, lambda p: p.write_text(json.dumps(payload, indent=2, default=str)))


def write_dir_atomic(
    target: Path, fill: Callable[[Path], Any], replace: bool = True, tmp_prefix: str | None = None
) -> bool:
    """Fill a fresh temporary folder beside ``target``, then rename it into place.

    ``replace=True``: an existing ``target`` is moved aside first and deleted after, so
    ``target`` is always the old complete folder or the new complete one. ``replace=False``:
    if ``target`` exists (another process published it first), keep theirs and drop ours.
    Returns whether this call's folder is the one in place. ``tmp_prefix`` names the temporary
    folder (``<prefix><random>``), so a caller can recognise a dead writer's debris.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{tmp_prefix or f'.{target.name}.tmp-'}{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        fill(tmp)
        _fsync_tree(tmp)
        old = None
        if target.exists():
            if not replace:
                return False
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None and not target.exists():
                os.rename(old, target)  # the old complete folder goes back
            if replace or not target.exists():
                raise
            return False  # lost a race to another publisher: theirs stays
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (copy where links are impossible): a file shared by
    several snapshots or cache entries is stored once on disk, and each folder stays self-contained."""
    for f in Path(src).rglob("*"):
        if f.is_file():
            link_file(f, Path(dst) / f.relative_to(src))


def link_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def fingerprint_path(path: str | os.PathLike) -> Any:
    """A file or folder named in a config (a saved model, a data file): its files' names, sizes, times.

    The path alone is not enough for a cache key: a folder overwritten with another model, or a CSV
    edited in place, must give another key. (Sizes and modification times, not contents: cheap for
    gigabytes, and a copy that keeps both is the same data.)
    """
    p = Path(path)
    if not p.exists():
        return {"path": str(path), "missing": True}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    stats = [(f, f.stat()) for f in files]
    return {
        "path": str(p.resolve()),
        "files": [
            (str(f.relative_to(p)) if f != p else f.name, st.st_size, st.st_mtime_ns) for f, st in stats
        ],
    }
