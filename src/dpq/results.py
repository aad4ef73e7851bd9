"""results.json: the run's resolved config, provenance and per-stage metrics; and its printed table."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "lightning", "transformers", "datasets", "torchmetrics", "hydra-core", "omegaconf", "fvcore", "wandb")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_info() -> dict:
    src = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(dirty) if dirty is not None else None}


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temporary file beside ``path``, fsync, rename: a reader never sees half a file."""
    from dpq.snapshot import write_json_atomic as write

    write(Path(path), payload)


COLUMNS = [  # (header, metric key, format)
    ("stage", None, None), ("model", None, None),
    ("acc", "accuracy", "{:.4f}"), ("val acc", "val_accuracy", "{:.4f}"),
    ("sparsity", "sparsity", "{:.3f}"), ("params nz", "params_nonzero", "{:,}"),
    ("GFLOPs", "dense_gflops", "{:.4g}"), ("eff GFLOPs", "effective_gflops", "{:.4g}"),
    ("size MB", "size_bytes", None), ("lat ms", "latency_ms_median", "{:.2f}"), ("time s", None, None),
]


def table_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        m = r["metrics"]
        row = []
        for header, key, fmt in COLUMNS:
            if header == "stage":
                row.append(r["stage"])
            elif header == "model":
                row.append(r["model"])
            elif header == "time s":
                row.append(f"{r['duration_s']:.0f}")
            elif header == "size MB":
                row.append(f"{m['size_bytes'] / 1e6:.4g}")
            else:
                v = m.get(key)
                row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    return rows


def print_table(records: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="left" if header in ("stage", "model") else "right")
    for row in table_rows(records):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
