"""Stage snapshots: what a run needs to continue after a finished stage, in one folder.

``<run>/checkpoints/stage_<i>_<name>/`` holds::

    student/                     dpq.checkpoints.save_model (shrunk and quantized models included)
    teacher/                     the frozen teacher, hard-linked from the snapshot that first saved it
    masks.safetensors            bool keep-masks by module name (absent before any pruning)
    teacher_logits.safetensors   the teacher's per-example logit cache (one set per ensemble member)
    manifest.json                written last: its presence marks the snapshot complete

The manifest carries the format version, the stage (index, name, kind, pipeline order), the
records so far, the quantized flag, the optimizer steps of every fit, and the size and SHA-256
of every file, so a truncated or edited file is detected when the snapshot is read instead of
being used. It holds no random state: every stage re-seeds (``seed + index``), so a snapshot
plus the run's config determines the rest of the run.

This module only reads and writes the folder format; :meth:`dpq.pipeline.RunState.save_snapshot`
and :meth:`~dpq.pipeline.RunState.load_snapshot` map it to and from a run, and a stage cache
across runs can reuse both (copy a folder, check its manifest, load it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout changes; older snapshots are then skipped with a message
MANIFEST = "manifest.json"
STUDENT, TEACHER, MASKS, TEACHER_LOGITS = "student", "teacher", "masks.safetensors", "teacher_logits.safetensors"


class SnapshotError(RuntimeError):
    """A snapshot folder cannot be used: incomplete, another format, or a file does not match its manifest."""


@dataclass
class Snapshot:
    directory: Path
    manifest: dict[str, Any]

    @property
    def stage_index(self) -> int:
        return int(self.manifest["stage_index"])

    @property
    def stage(self) -> str:
        return str(self.manifest["stage"])

    def has(self, part: str) -> bool:
        return part in self.manifest["parts"]

    def path(self, part: str) -> Path:
        return self.directory / part


def safe_name(name: str) -> str:
    """A stage or fit name as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def stage_dir(checkpoints: Path, index: int, name: str) -> Path:
    """``<checkpoints>/stage_<i>_<name>``."""
    return Path(checkpoints) / f"stage_{index}_{safe_name(name)}"


# ---- atomic writes --------------------------------------------------------------------------
def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name in the same folder, fsync, then rename over ``path``.

    A reader (or a resumed run) sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """JSON through :func:`write_file_atomic` (results.json, manifests, run.json)."""
    write_file_atomic(path, lambda p: p.write_text(json.dumps(payload, indent=2, default=str)))


def write_dir_atomic(target: Path, fill: Callable[[Path], Any]) -> None:
    """Fill a fresh temporary folder beside ``target``, then swap it into place.

    The old folder (if any) is moved aside before the rename and deleted after, so ``target``
    is always either the old complete folder or the new complete one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        fill(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: Path, parts: Iterable[str]) -> list[str]:
    out = []
    for part in parts:
        p = directory / part
        if p.is_dir():
            out += sorted(str(f.relative_to(directory)) for f in p.rglob("*") if f.is_file())
        elif p.exists():
            out.append(part)
    return out


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (copy where links are impossible): the teacher is
    stored once on disk however many snapshots hold it, and each snapshot stays self-contained."""
    for f in src.rglob("*"):
        if f.is_file():
            d = dst / f.relative_to(src)
            d.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, d)
            except OSError:
                shutil.copy2(f, d)


# ---- teacher logit caches --------------------------------------------------------------------
def teacher_caches(teacher_logits) -> list:
    """The :class:`dpq.distill.TeacherLogits` caches behind a run's teacher (ensemble members in order)."""
    if teacher_logits is None:
        return []
    members = getattr(teacher_logits, "teachers", None)
    return list(members) if members is not None else [teacher_logits]


def cache_state(caches: list) -> dict[str, torch.Tensor]:
    """The caches as flat tensors: which rows are filled, their logits, the forward count."""
    out = {}
    for i, c in enumerate(caches):
        out[f"{i}.logits"] = c.logits.detach().cpu().contiguous()
        out[f"{i}.filled"] = c.filled.detach().cpu().contiguous()
        out[f"{i}.forward_examples"] = torch.tensor([int(c.forward_examples)])
    return out


def load_cache_state(caches: list, state: dict[str, torch.Tensor]) -> None:
    """Put saved rows back, so a resumed run reads exactly the logits the first run computed."""
    n = len({k.split(".")[0] for k in state})
    if n != len(caches):
        raise SnapshotError(f"teacher logit cache has {n} members, the run's teacher has {len(caches)}")
    for i, c in enumerate(caches):
        logits, filled = state[f"{i}.logits"], state[f"{i}.filled"]
        if tuple(logits.shape) != tuple(c.logits.shape):
            raise SnapshotError(f"teacher logit cache {i} has shape {tuple(logits.shape)}, expected {tuple(c.logits.shape)}")
        c.logits.copy_(logits)
        c.filled.copy_(filled)
        c.forward_examples = int(state[f"{i}.forward_examples"][0])


# ---- write / read ----------------------------------------------------------------------------
def write(directory: Path, manifest: dict[str, Any], *, student: nn.Module | None = None,
          teacher: nn.Module | None = None, teacher_from: Snapshot | None = None,
          masks: dict[str, torch.Tensor] | None = None, teacher_logits: dict[str, torch.Tensor] | None = None) -> Snapshot:
    """Write a complete snapshot into ``directory`` (created; other entries such as ``lightning/`` kept).

    ``teacher_from``: a snapshot that already holds this very teacher; its files are linked
    instead of saving the model again. ``manifest`` gets ``format``, ``parts``, ``files`` and
    ``created`` added and is written last.
    """
    from dpq.checkpoints import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # from here until the end the snapshot is incomplete
    parts: list[str] = []
    known: dict[str, dict] = {}
    if student is not None:
        write_dir_atomic(directory / STUDENT, lambda d: save_model(student, d))
        parts.append(STUDENT)
    if teacher is not None:
        if (teacher_from is not None and teacher_from.has(TEACHER) and teacher_from.path(TEACHER).is_dir()
                and teacher_from.directory.resolve() != directory.resolve()):
            write_dir_atomic(directory / TEACHER, lambda d: _link_tree(teacher_from.path(TEACHER), d))
            known = {k: v for k, v in teacher_from.manifest["files"].items() if k.startswith(f"{TEACHER}/")}
        elif not (teacher_from is not None and teacher_from.directory.resolve() == directory.resolve()):
            write_dir_atomic(directory / TEACHER, lambda d: save_model(teacher, d))
        parts.append(TEACHER)
    if masks:
        write_file_atomic(directory / MASKS, lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in masks.items()}, str(p)))
        parts.append(MASKS)
    if teacher_logits:
        write_file_atomic(directory / TEACHER_LOGITS, lambda p: save_file(teacher_logits, str(p)))
        parts.append(TEACHER_LOGITS)
    files = {}
    for rel in _files(directory, parts):
        p = directory / rel
        files[rel] = known.get(rel) or {"size": p.stat().st_size, "sha256": _digest(p)}
    full = {**manifest, "format": FORMAT, "parts": parts, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(directory / MANIFEST, full)
    return Snapshot(directory, full)


def read(directory: Path, verify: bool = True) -> Snapshot:
    """The snapshot in ``directory``; :class:`SnapshotError` if incomplete, of another format or corrupt.

    ``verify`` re-hashes every file against the manifest (a truncated or edited file fails).
    """
    directory = Path(directory)
    mf = directory / MANIFEST
    if not mf.exists():
        raise SnapshotError(f"{directory}: incomplete (no {MANIFEST}; the run stopped while writing it)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{directory}: unreadable {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{directory}: snapshot format {manifest.get('format')!r}, this dpq reads format {FORMAT}; "
                            "ignored (written by another dpq version)")
    for rel, info in manifest.get("files", {}).items():
        p = directory / rel
        if not p.is_file():
            raise SnapshotError(f"{directory}: {rel} is missing")
        if p.stat().st_size != info["size"]:
            raise SnapshotError(f"{directory}: {rel} has {p.stat().st_size} bytes, the manifest says {info['size']} (truncated?)")
        if verify and _digest(p) != info["sha256"]:
            raise SnapshotError(f"{directory}: {rel} does not match its SHA-256 in the manifest (corrupted)")
    return Snapshot(directory, manifest)


def load_masks(snap: Snapshot) -> dict[str, torch.Tensor] | None:
    return dict(load_file(str(snap.path(MASKS)))) if snap.has(MASKS) else None


def load_teacher_logits(snap: Snapshot) -> dict[str, torch.Tensor] | None:
    return dict(load_file(str(snap.path(TEACHER_LOGITS)))) if snap.has(TEACHER_LOGITS) else None


def latest(checkpoints: Path, order: list[str]) -> Snapshot | None:
    """The newest snapshot of this pipeline that reads back intact; older ones are tried in turn.

    Every snapshot skipped (incomplete, corrupt, another format, another pipeline) is logged
    with its reason, so a fallback is never silent.
    """
    found = []
    for d in Path(checkpoints).glob("stage_*_*"):
        m = re.match(r"stage_(\d+)_", d.name)
        if d.is_dir() and m:
            found.append((int(m.group(1)), d))
    for index, d in sorted(found, reverse=True):
        try:
            snap = read(d)
        except SnapshotError as e:
            if (d / MANIFEST).exists():
                log.warning("skipping snapshot: %s; using an earlier one", e)
            continue
        if list(snap.manifest.get("order", [])) != list(order) or snap.stage_index != index:
            log.warning("skipping snapshot %s: it belongs to pipeline %s, this run is %s", d, snap.manifest.get("order"), order)
            continue
        return snap
    return None
