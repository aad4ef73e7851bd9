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

:func:`write` / :func:`read` handle the folder format; :func:`save_state` / :func:`load_state` map
it to and from a run's :class:`~dpq.run.state.State`. The stage cache across runs reuses both
(link a folder, check its manifest, load it).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpq.core.files import link_tree, sha256_file, write_dir_atomic, write_file_atomic, write_json_atomic
from dpq.distill.teachers import cache_state, load_cache_state, teacher_caches, teacher_signal
from dpq.models import save_model
from dpq.run.state import State

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout changes; older snapshots are then skipped with a message
MANIFEST = "manifest.json"
STUDENT, TEACHER, MASKS, TEACHER_LOGITS = (
    "student",
    "teacher",
    "masks.safetensors",
    "teacher_logits.safetensors",
)


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


def _files(directory: Path, parts: Iterable[str]) -> list[str]:
    out = []
    for part in parts:
        p = directory / part
        if p.is_dir():
            out += sorted(str(f.relative_to(directory)) for f in p.rglob("*") if f.is_file())
        elif p.exists():
            out.append(part)
    return out


# ---- write / read ----------------------------------------------------------------------------
def write(
    directory: Path,
    manifest: dict[str, Any],
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    teacher_from: Snapshot | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    teacher_logits: dict[str, torch.Tensor] | None = None,
) -> Snapshot:
    """Write a complete snapshot into ``directory`` (created; other entries such as ``lightning/`` kept).

    ``teacher_from``: a snapshot that already holds this very teacher; its files are linked
    instead of saving the model again. ``manifest`` gets ``format``, ``parts``, ``files`` and
    ``created`` added and is written last.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # from here until the end the snapshot is incomplete
    parts: list[str] = []
    known: dict[str, dict] = {}
    if student is not None:
        write_dir_atomic(directory / STUDENT, lambda d: save_model(student, d))
        parts.append(STUDENT)
    if teacher is not None:
        if (
            teacher_from is not None
            and teacher_from.has(TEACHER)
            and teacher_from.path(TEACHER).is_dir()
            and teacher_from.directory.resolve() != directory.resolve()
        ):
            known = {k: v for k, v in teacher_from.manifest["files"].items() if k.startswith(f"{TEACHER}/")}
            linked = []

            def link_or_save(d: Path) -> None:
                # The source entry may be evicted (``python -m dpq.stage_cache prune``) while this links
                # from it: then the links are fewer than its manifest lists, and the teacher is saved anew
                # (an empty teacher/ passed the manifest check and crashed every run that read it).
                try:
                    link_tree(teacher_from.path(TEACHER), d)
                    got = {f"{TEACHER}/{f.relative_to(d).as_posix()}" for f in d.rglob("*") if f.is_file()}
                    linked.append(got == set(known))
                except OSError:
                    linked.append(False)
                if not linked[0]:
                    shutil.rmtree(d)
                    d.mkdir()
                    save_model(teacher, d)

            write_dir_atomic(directory / TEACHER, link_or_save)
            if not linked[0]:
                known = {}
        elif not (teacher_from is not None and teacher_from.directory.resolve() == directory.resolve()):
            write_dir_atomic(directory / TEACHER, lambda d: save_model(teacher, d))
        parts.append(TEACHER)
    if masks:
        write_file_atomic(
            directory / MASKS,
            lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in masks.items()}, str(p)),
        )
        parts.append(MASKS)
    if teacher_logits:
        write_file_atomic(directory / TEACHER_LOGITS, lambda p: save_file(teacher_logits, str(p)))
        parts.append(TEACHER_LOGITS)
    files = {}
    for rel in _files(directory, parts):
        p = directory / rel
        files[rel] = known.get(rel) or {"size": p.stat().st_size, "sha256": sha256_file(p)}
    full = {
        **manifest,
        "format": FORMAT,
        "parts": parts,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
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
        raise SnapshotError(
            f"{directory}: snapshot format {manifest.get('format')!r}, this dpq reads format {FORMAT}; "
            "ignored (written by another dpq version)"
        )
    files = manifest.get("files", {})
    for part in manifest.get("parts", []):  # a part with no file listed (e.g. a teacher linked from an
        if not any(rel == part or rel.startswith(f"{part}/") for rel in files):  # evicted entry) is not there
            raise SnapshotError(f"{directory}: its {part} holds no file")
    for rel, info in files.items():
        p = directory / rel
        if not p.is_file():
            raise SnapshotError(f"{directory}: {rel} is missing")
        if p.stat().st_size != info["size"]:
            raise SnapshotError(
                f"{directory}: {rel} has {p.stat().st_size} bytes, the manifest says {info['size']} (truncated?)"
            )
        if verify and sha256_file(p) != info["sha256"]:
            raise SnapshotError(f"{directory}: {rel} does not match its SHA-256 in the manifest (corrupted)")
    return Snapshot(directory, manifest)


def load_masks(snap: Snapshot) -> dict[str, torch.Tensor] | None:
    return dict(load_file(str(snap.path(MASKS)))) if snap.has(MASKS) else None


def load_teacher_logits(snap: Snapshot) -> dict[str, torch.Tensor] | None:
    return dict(load_file(str(snap.path(TEACHER_LOGITS)))) if snap.has(TEACHER_LOGITS) else None


# ---- a run's state <-> a snapshot ----------------------------------------------------------------
def save_state(
    state: State,
    directory: Path | str,
    order: list[str],
    seed: Any,
    kind: str | None,
    teacher_from: Snapshot | None = None,
) -> Snapshot:
    """Write ``state`` after its current stage into ``directory``; the manifest goes last.

    Holds the student (shrunk and quantized models too), the teacher (linked from
    ``teacher_from``, a snapshot that already holds this very teacher), the masks, the teacher's
    logit cache, the records, the quantized flag, the stage index and every fit's step count. No
    RNG state: each stage re-seeds with ``seed + index``.
    """
    manifest = {
        "stage_index": state.stage_index,
        "stage": state.stage_name,
        "kind": kind,
        "order": list(order),
        "quantized": state.quantized,
        "records": state.records,
        "fit_steps": dict(state.fit_steps),
        "seed": seed,
        "teacher_ensemble": state.teacher_ensemble,
    }
    return write(
        directory,
        json.loads(json.dumps(manifest, default=str)),
        student=state.student,
        teacher=state.teacher,
        teacher_from=teacher_from,
        masks=state.masks,
        teacher_logits=cache_state(teacher_caches(state.teacher_logits)) or None,
    )


def load_state(
    snap: Snapshot, load_model: Callable[[str, Path], nn.Module], num_examples: int, num_labels: int
) -> State:
    """The :class:`State` that :func:`save_state` wrote (raises :class:`SnapshotError` if unusable).

    ``load_model(role, folder)`` reads a saved teacher or student.
    """
    m = snap.manifest
    state = State(
        records=list(m["records"]),
        quantized=bool(m["quantized"]),
        fit_steps=dict(m.get("fit_steps") or {}),
        stage_index=snap.stage_index,
        stage_name=m.get("stage"),
    )
    ensemble = m.get("teacher_ensemble")
    if ensemble is None:  # snapshots written before the manifest carried it: the teacher stage's record says
        ensemble = next((r["ensemble"] for r in state.records if r.get("ensemble")), None)
    if snap.has(TEACHER):
        state.teacher = load_model("teacher", snap.path(TEACHER)).eval().requires_grad_(False)
        state.teacher_ensemble = ensemble
        members = (ensemble or {}).get("members") or []
        state.teacher_logits = teacher_signal(
            state.teacher,
            num_examples,
            num_labels,
            members,
            (ensemble or {}).get("weights"),
            load=lambda p: load_model("teacher", p),
        )
    cached = load_teacher_logits(snap)
    if cached:
        try:
            load_cache_state(teacher_caches(state.teacher_logits), cached)
        except ValueError as e:
            raise SnapshotError(f"{snap.directory}: {e}") from None
    if snap.has(STUDENT):
        state.student = load_model("student", snap.path(STUDENT))
    state.masks = load_masks(snap)
    return state


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
            log.warning(
                "skipping snapshot %s: it belongs to pipeline %s, this run is %s",
                d,
                snap.manifest.get("order"),
                order,
            )
            continue
        return snap
    return None
