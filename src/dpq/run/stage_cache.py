"""Reuse the state after a shared prefix of the pipeline across runs and sweep trials.

Sweep trials differ mostly in their *later* stages (the final sparsity, the bit width), so
most of them start with the same teacher -> distill (-> prune ...) prefix. The state after
such a prefix is stored once under a key that hashes everything that determines it
(:func:`prefix_key`), and every later trial loads it instead of training it again.

:class:`StageCache` is safe for parallel agents on one machine (or on a shared file system
with working ``flock``): an entry is built in a temporary folder and renamed into place with
its manifest written last, so a reader never sees half an entry; builders of the same key
take an exclusive ``fcntl.flock`` on ``<key>.lock``, so two trials that need the same
missing prefix build it once -- the second waits, then reuses it. The kernel drops the lock
when its holder dies, so a killed trial never blocks the others.

Written by hand (fcntl + rename, :mod:`dpq.core.files`) rather than with a locking library: the
standard library gives exactly the two primitives needed, and the semantics (lock released on
death, atomic rename) are the operating system's, not a library's.

``python -m dpq.stage_cache list | prune`` (:func:`main`) shows and trims it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from dpq.core.config import BOOKKEEPING_KEYS, BOOKKEEPING_STAGE_KEYS
from dpq.core.files import fingerprint_path, write_dir_atomic
from dpq.core.provenance import code_fingerprint, training_settings
from dpq.stages import build_stages

log = logging.getLogger(__name__)

# Bump when the layout of an entry or the meaning of a key changes: older entries are ignored.
# 2: keys hash dpq's source files, full numerics-library versions and the cost settings; the
#    manifest records the code fingerprint, so entries from other code can be listed as stale.
CACHE_FORMAT = 2
MANIFEST = "dpq-stage-cache.json"

# The key leaves out the config's bookkeeping (dpq.core.config.BOOKKEEPING_KEYS) and ``export``, which
# runs after the last stage and is never part of a stage's state.
#
# ``cost`` is *in* the key. Every restored record carries cost figures (FLOPs, BOPs, peak memory,
# latency) measured under the building run's ``cost`` settings, and an entry holds only the model
# after its last stage, so the earlier records of a restored prefix could not be measured again.
# With the cost settings in the key, every figure in a results.json was measured under the
# conditions it states; a run with other cost settings trains its own prefix.
IGNORED_KEYS = BOOKKEEPING_KEYS | {"export"}
IGNORED_STAGE_KEYS = BOOKKEEPING_STAGE_KEYS


class CacheBusy(TimeoutError):
    """Another process is still building this entry after ``timeout`` seconds."""


def stale_reason(manifest: Mapping[str, Any]) -> str | None:
    """Why an entry can never be used by this dpq, anywhere (another cache format, other dpq code, other
    numerics-library versions), or None. Keys already cover these, so such an entry is never looked up; this
    lets ``list`` and ``prune --stale`` tell it apart from a merely unused one."""
    if manifest.get("format") != CACHE_FORMAT:
        return f"cache format {manifest.get('format')}"
    code, now = manifest.get("code") or {}, code_fingerprint()
    if code.get("dpq_source") != now["dpq_source"]:
        return "other dpq code"
    if code.get("libraries") != now["libraries"]:
        return "other library versions"
    return None


def elsewhere_reason(manifest: Mapping[str, Any]) -> str | None:
    """Why this process cannot use an entry that other processes of this dpq can (another processor or
    GPU, other threads or visible GPUs: a shared cache, a DDP run, an agent pinned elsewhere), or None.
    Not stale: ``prune --stale`` keeps such entries for the processes that built them."""
    code, now = manifest.get("code") or {}, code_fingerprint()
    if (was := code.get("hardware") or {}) != now["hardware"]:
        gpu_keys = ("gpus", "torch_cuda")
        same_cpu = all(was.get(k) == v for k, v in now["hardware"].items() if k not in gpu_keys)
        return "another GPU or CUDA build" if same_cpu else "another processor"
    if code.get("compute") != now["compute"]:
        return "other threads or visible GPUs"
    return None


def _stage_payload(stage) -> dict:
    cfg = asdict(stage.cfg) if is_dataclass(stage.cfg) else dict(stage.cfg)
    out = {k: v for k, v in cfg.items() if k not in IGNORED_STAGE_KEYS}
    if out.get("load_from"):
        out["load_from"] = fingerprint_path(out["load_from"])
    if out.get("ensemble"):
        out["ensemble"] = [fingerprint_path(p) for p in out["ensemble"]]
    qat = getattr(stage, "qat_settings", None)
    if callable(qat) and qat() is not None:  # quantize-aware: the later stage's quantization shapes this one
        out["qat_settings"] = qat()
    return {"name": stage.name, "kind": stage.kind, "config": out}


def key_payload(
    cfg_dict: Mapping[str, Any], stage_names_prefix: Sequence[str], extra: Mapping[str, Any] | None = None
) -> dict:
    """What :func:`prefix_key` hashes (exposed so a cache entry can say what it holds)."""
    prefix = list(stage_names_prefix)
    pipeline = cfg_dict["pipeline"]
    order = list(pipeline.get("order") or [])
    if not prefix or order[: len(prefix)] != prefix:
        raise ValueError(f"{prefix} is not a non-empty prefix of pipeline.order {order}")
    # Stage configs as the stages parse them (defaults filled, numbers coerced), so "0.5" and 0.5 agree.
    stages = build_stages({"order": order, "stages": pipeline.get("stages") or {}})[: len(prefix)]
    rest = {k: v for k, v in cfg_dict.items() if k not in IGNORED_KEYS and k != "pipeline"}
    if isinstance(rest.get("trainer"), Mapping):
        rest["trainer"] = training_settings(rest["trainer"])
    from dpq.models import local_folders, run_hub_commits

    # A model, tokenizer or base config read from a local folder: the folder's files too (it may be
    # overwritten in place). The model's own folder under "teacher"/"model", the others as "teacher.tokenizer".
    local = {
        k if sub == "pretrained" else f"{k}.{sub}": fingerprint_path(f)
        for k in ("teacher", "model")
        for sub, f in local_folders(cfg_dict.get(k) or {}).items()
    }
    if local:
        rest["local_models"] = local
    # A model read from the hub: the commit its branch pointed to (a branch moves; a commit does not).
    if hub := run_hub_commits(cfg_dict):
        rest["hub_models"] = hub
    return {
        "format": CACHE_FORMAT,
        "code": code_fingerprint(),  # dpq's source files and the numerics libraries' full versions
        "config": rest,  # task, teacher, model, trainer, seed and anything added later (correct before reusable)
        "stages": [_stage_payload(s) for s in stages],  # in order: position i is also seeded with seed + i
        "extra": dict(extra or {}),
    }


def prefix_key(
    cfg_dict: Mapping[str, Any], stage_names_prefix: Sequence[str], extra: Mapping[str, Any] | None = None
) -> str:
    """Hash of everything that determines the state after the stages ``stage_names_prefix``.

    Covers the task, teacher and student specs, every trainer argument that affects numbers, the
    seed, the cost settings, the prefix stages' parsed configs in order, a hash of dpq's source
    files, the full versions of the numerics libraries (:func:`~dpq.core.provenance.code_fingerprint`)
    and :data:`CACHE_FORMAT`, plus ``extra`` (run-time facts such as the data source actually
    loaded). Leaves out the logger, paths, run name and every stage after the prefix, so trials
    that differ only there share the key.
    ``cfg_dict`` is the resolved run config (``OmegaConf.to_container(cfg, resolve=True)``).
    """
    payload = key_payload(cfg_dict, stage_names_prefix, extra)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pipeline_keys(cfg_dict: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> list[str]:
    """``keys[i]`` is the key of the state after stages ``order[: i + 1]``."""
    order = list(cfg_dict["pipeline"]["order"])
    return [prefix_key(cfg_dict, order[: i + 1], extra) for i in range(len(order))]


class StageCache:
    """Complete entries ``<root>/<key>/`` (manifest last), built under ``<root>/<key>.lock``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def manifest(self, key: str) -> dict | None:
        try:
            return json.loads((self.path(key) / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    def lookup(self, key: str, touch: bool = True) -> Path | None:
        """The entry for ``key`` if it is complete, of the current format and from this code, else None.
        ``touch=False``: look without marking it used (a dry run writes nothing, eviction order included)."""
        entry = self.path(key)
        if not entry.is_dir():
            return None
        man = self.manifest(key)
        if man is None:
            log.info("stage cache: %s has no manifest (incomplete or foreign); ignoring it", entry)
            return None
        if man.get("format") != CACHE_FORMAT:
            log.info(
                "stage cache: %s has cache format %s, this dpq writes %s; ignoring it",
                entry,
                man.get("format"),
                CACHE_FORMAT,
            )
            return None
        if man.get("key") != key:
            log.info("stage cache: %s holds key %s; ignoring it", entry, man.get("key"))
            return None
        reason = stale_reason(man) or elsewhere_reason(man)
        if reason is not None:  # the key covers the code, so only a hand-made entry gets here
            log.info("stage cache: %s comes from %s; ignoring it", entry, reason)
            return None
        if touch:  # last use, for evicting the least recently used (a read-only cache: skipped)
            with contextlib.suppress(OSError):
                os.utime(entry / MANIFEST)
        return entry

    def stale(self) -> dict[str, str]:
        """``{key: reason}`` of every complete entry this code can never use (:func:`stale_reason`);
        reads only the manifests."""
        out = {}
        for man_path in self.root.glob(f"*/{MANIFEST}"):
            key = man_path.parent.name
            man = None if key.startswith(".") else self.manifest(key)
            if man is not None and man.get("key") == key and (reason := stale_reason(man)):
                out[key] = reason
        return out

    def stale_summary(self) -> str | None:
        """One line for the run's log: how many entries were left out, and why; None if none was."""
        counts = Counter(self.stale().values())
        if not counts:
            return None
        parts = [f"{n} {'entry' if n == 1 else 'entries'} from {why}" for why, n in sorted(counts.items())]
        return (
            f"stage cache: {', '.join(parts)} ignored "
            f"(`python -m dpq.stage_cache prune --stale --dir {self.root}` removes them)"
        )

    def longest_prefix(self, keys: Sequence[str], touch: bool = True) -> tuple[int, Path | None]:
        """``(n, entry)`` for the longest cached prefix (``keys[n - 1]``); ``(0, None)`` if none is cached."""
        for n in range(len(keys), 0, -1):
            hit = self.lookup(keys[n - 1], touch=touch)
            if hit is not None:
                return n, hit
        return 0, None

    @contextlib.contextmanager
    def lock(
        self, key: str, timeout: float | None = None, poll_s: float = 0.2, shared: bool = False
    ) -> Iterator[None]:
        """Exclusive per-key lock (``flock``); released on exit or when the holder dies.
        ``shared``: a reader's lock -- many at once, none while a builder or an eviction holds it.

        Lock files are never deleted: removing one while another process waits on it would let
        a third process lock a new file of the same name, and two builders would run at once.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            if timeout is None:
                fcntl.flock(fd, mode)
            else:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() >= deadline:
                            raise CacheBusy(
                                f"stage cache entry {key} is still being built by another process "
                                f"after {timeout:.0f} s"
                            ) from None
                        time.sleep(poll_s)
            if not shared:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())  # for a person wondering who holds it
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def build(
        self,
        key: str,
        builder: Callable[[Path], None],
        meta: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Path:
        """The complete entry for ``key``, calling ``builder(folder)`` to write it if it is missing."""
        return self.get_or_build(key, builder, meta, timeout)[0]

    def get_or_build(
        self,
        key: str,
        builder: Callable[[Path], None],
        meta: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[Path, bool]:
        """``(entry, built_here)``. ``builder`` writes into an empty folder; it runs at most once per key.

        Under the key's lock: look again (another process may have finished it while we
        waited), remove debris (temporary folders of dead builders, an entry of an older
        format), build into a temporary folder, write the manifest last, rename into place.
        A builder that raises leaves nothing behind. ``timeout`` (seconds) bounds the wait
        for another builder; then :class:`CacheBusy` is raised.
        """
        hit = self.lookup(key)
        if hit is not None:
            return hit, False
        with self.lock(key, timeout):
            hit = self.lookup(key)
            if hit is not None:
                log.info(
                    "stage cache: %s was built by another process while this one waited; reusing it", key
                )
                return hit, False
            self._remove_debris(key)

            def fill(folder: Path) -> None:
                builder(folder)
                self._write_manifest(folder, key, meta)  # last: its presence marks the entry complete

            write_dir_atomic(self.path(key), fill, replace=False, tmp_prefix=f".tmp-{key}-")
        log.info("stage cache: stored %s", self.path(key))
        return self.path(key), True

    def discard(self, key: str, reason: str = "") -> None:
        """Remove an entry that turned out unusable (e.g. a file fails its checksum); others rebuild it."""
        with self.lock(key):
            if self.path(key).exists():
                log.warning("stage cache: discarding %s%s", self.path(key), f" ({reason})" if reason else "")
            self._remove_debris(key)

    def entries(self) -> list[dict]:
        """Every complete entry: key, path, bytes, stages, created, last use (the manifest's mtime,
        refreshed on each hit), ``stale`` (why this code can never use it, else None), least
        recently used first."""
        out = []
        for man_path in self.root.glob(f"*/{MANIFEST}"):
            key = man_path.parent.name
            man = None if key.startswith(".") else self.manifest(key)
            if man is None or man.get("key") != key:
                continue
            try:
                stats = [
                    st for st in (f.stat() for f in man_path.parent.rglob("*")) if stat.S_ISREG(st.st_mode)
                ]
                last_used = man_path.stat().st_mtime
            except FileNotFoundError:  # evicted by another process while this one listed it
                continue
            out.append(
                {
                    "key": key,
                    "path": str(man_path.parent),
                    "bytes": sum(st.st_size for st in stats),
                    "files": {(st.st_dev, st.st_ino): st.st_size for st in stats},
                    "stages": man.get("stages"),
                    "created": man.get("created"),
                    "last_used": last_used,
                    "stale": (why := stale_reason(man)),
                    "elsewhere": None if why else elsewhere_reason(man),
                }
            )
        return sorted(out, key=lambda e: e["last_used"])

    @staticmethod
    def disk_bytes(entries: list[dict]) -> int:
        """Bytes on disk of ``entries`` together: entries hard-link the files they share (a
        teacher published with each later prefix), which their ``bytes`` count once each."""
        return sum({k: v for e in entries for k, v in e["files"].items()}.values())

    @contextlib.contextmanager
    def reading(self, key: str) -> Iterator[Path | None]:
        """Hold ``key`` against eviction while restoring from it: yields the entry, or None if it
        went (evicted or discarded) between the lookup and now."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.lock(key, shared=True))
            except OSError as e:  # a read-only cache (shared, mounted): nothing can evict from it either
                log.debug("stage cache: reading %s without a lock (%s)", key, e)
            yield self.lookup(key)

    def evict(self, key: str, wait_s: float = 0.0) -> bool:
        """Remove an entry unless a run is reading it or another process building it (then False)."""
        try:
            with self.lock(key, timeout=wait_s):
                if not self.path(key).exists():
                    return False
                self._remove_debris(key)
        except CacheBusy:
            return False
        log.info("stage cache: evicted %s", key)
        return True

    def prune(
        self,
        max_bytes: int | None = None,
        older_than_s: float | None = None,
        dry_run: bool = False,
        stale: bool = False,
    ) -> list[dict]:
        """Evict entries: with ``stale``, every entry this code can never use; then, least recently
        used first, every entry unused for ``older_than_s`` seconds, then more until the rest fit in
        ``max_bytes``. Returns the evicted (or, dry run, the chosen) entries."""
        entries, now = self.entries(), time.time()
        kept, chosen = list(entries), []
        for e in entries:  # least recently used first
            too_old = older_than_s is not None and now - e["last_used"] > older_than_s
            too_big = max_bytes is not None and self.disk_bytes(kept) > max_bytes
            if not ((stale and e["stale"]) or too_old or too_big):
                continue
            if dry_run or self.evict(e["key"]):
                chosen.append(e)
                kept.remove(e)
        return chosen

    def _remove_debris(self, key: str) -> None:
        """Call with the key's lock held: nothing else can be writing these."""
        for tmp in self.root.glob(f".tmp-{key}-*"):
            shutil.rmtree(tmp, ignore_errors=True)  # a builder that died (its lock is gone, ours is held)
        entry = self.path(key)
        if entry.exists():  # lookup() rejected it: older format or incomplete; never read, replace
            trash = self.root / f".trash-{key}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _write_manifest(folder: Path, key: str, meta: Mapping[str, Any] | None) -> None:
        man = {
            "format": CACHE_FORMAT,
            "key": key,
            "code": code_fingerprint(),  # lets `list` mark entries of other code stale
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": os.uname().nodename,
            "pid": os.getpid(),
            **dict(meta or {}),
        }
        path = folder / MANIFEST
        with open(path, "w") as f:
            json.dump(man, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------- command line


def _human(n: float) -> str:
    return (
        f"{int(n)} B"
        if n < 1000
        else next(f"{n / d:.1f} {u}" for d, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")) if n >= d)
    )


def default_dir() -> Path:
    """``stage_cache.dir`` as conf/train.yaml resolves it (``$DPQ_CACHE_DIR/stages`` by default)."""
    from hydra import compose, initialize_config_dir

    from dpq.core.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return Path(compose("train").stage_cache.dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpq.stage_cache [--dir D] list | prune [--stale] [--max-gb X] [--older-than-days N] [--dry-run]``."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m dpq.stage_cache",
        description="List the stage cache, or evict stale and least recently used entries.",
    )
    ap.add_argument("--dir", type=Path, default=None, help="default: $DPQ_CACHE_DIR/stages (stage_cache.dir)")
    # --dir also after the command (`prune --stale --dir D`, as the run's log line writes it)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "list", parents=[where], help="entries, least recently used first, with sizes; stale ones marked"
    )
    pr = sub.add_parser(
        "prune",
        parents=[where],
        help="evict stale entries (other dpq code, library versions or cache format), entries unused "
        "for N days, then the least recently used above a size",
    )
    pr.add_argument("--stale", action="store_true", help="entries this dpq can never use")
    pr.add_argument("--max-gb", type=float, default=None)
    pr.add_argument("--older-than-days", type=float, default=None)
    pr.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    root = args.dir or default_dir()
    if not root.is_dir():
        ap.exit(2, f"stage cache: no folder {root} (set --dir or DPQ_CACHE_DIR)\n")
    cache = StageCache(root)
    # the cache root ($DPQ_CACHE_DIR) given for its stages/ folder
    if args.dir and not cache.entries() and (root / "stages").is_dir():
        root = root / "stages"
        cache = StageCache(root)
        print(f"(--dir {args.dir} is the cache root; its entries are in {root})", file=sys.stderr)
    if args.cmd == "list":
        entries = cache.entries()
        for e in entries:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
            mark = f"  STALE ({e['stale']})" if e["stale"] else ""
            if not mark and e["elsewhere"]:
                mark = f"  built under {e['elsewhere']} than this process (usable there; kept by --stale)"
            print(
                f"{e['key']}  {_human(e['bytes']):>9}  last used {used}  "
                f"{' -> '.join(e['stages'] or [])}{mark}"
            )
        n_stale = sum(1 for e in entries if e["stale"])
        print(
            f"{len(entries)} entries ({n_stale} stale: `prune --stale` removes them), "
            f"{_human(StageCache.disk_bytes(entries))} on disk in {root} "
            f"(files shared by several entries are hard links, counted once)"
        )
        return 0
    if args.max_gb is None and args.older_than_days is None and not args.stale:
        ap.exit(2, "stage cache prune: give --stale, --max-gb and/or --older-than-days\n")
    for name, v in (("--max-gb", args.max_gb), ("--older-than-days", args.older_than_days)):
        if v is not None and v < 0:
            ap.exit(2, f"stage cache prune: {name} must be >= 0, got {v}\n")
    gone = cache.prune(
        None if args.max_gb is None else int(args.max_gb * 1e9),
        None if args.older_than_days is None else args.older_than_days * 86400,
        args.dry_run,
        stale=args.stale,
    )
    verb = "would evict" if args.dry_run else "evicted"
    for e in gone:
        why = f"  ({e['stale']})" if e["stale"] else ""
        print(f"{verb} {e['key']}  {_human(e['bytes'])}  {' -> '.join(e['stages'] or [])}{why}")
    gone_keys = {e["key"] for e in gone}
    left = StageCache.disk_bytes([e for e in cache.entries() if e["key"] not in gone_keys])
    print(f"{verb} {len(gone)} entries; {_human(left)} left on disk in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
