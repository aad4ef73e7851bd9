"""results.json: the run's resolved config, provenance and per-stage metrics; and its printed table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dpq.core.files import write_json_atomic
from dpq.core.provenance import GitState, hardware, library_versions
from dpq.metrics import primary_metric, task_metrics
from dpq.models import run_hub_commits

PROVENANCE = "provenance"  # <run>/provenance/: git.json (one entry per start) and the uncommitted diff


def save_provenance(output_dir: Path, git: GitState) -> dict:
    """Record the git state a run (or a resume of it) started from: appended to
    ``<run>/provenance/git.json``, the diff saved beside it when the tree was dirty. Returns what
    results.json reports as ``git`` (the hashes and the patch's path relative to the run folder)."""
    folder = Path(output_dir) / PROVENANCE
    log_file = folder / "git.json"
    try:
        starts = json.loads(log_file.read_text())
    except (OSError, ValueError):
        starts = []
    name = "diff.patch" if not starts else f"diff-start{len(starts)}.patch"
    patch = git.save(folder, name)
    info = {
        **git.info,
        "patch": str(patch.relative_to(output_dir)) if patch else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(log_file, [*starts, info])
    return info


def git_starts(output_dir: Path) -> list[dict]:
    """Every start's git state recorded by :func:`save_provenance` (a resumed run has several)."""
    try:
        return json.loads((Path(output_dir) / PROVENANCE / "git.json").read_text())
    except (OSError, ValueError):
        return []


def results(
    cfg: dict,
    state,
    order: list[str],
    final: dict,
    role: str,
    splits,
    model_dir: Path | None,
    wall_time_s: float,
    resumed_after: str | None,
    git: dict,
    earlier_starts: list[dict] | None = None,
) -> dict:
    """results.json of a completed run. ``git``: the state this process started from; a resumed
    run also lists the ``earlier_starts``, each recorded when it started."""
    task, recs = cfg["task"], state.records
    extra = {"git_earlier_starts": earlier_starts} if earlier_starts else {}
    return {
        "status": "completed",
        "run_name": cfg["run_name"],
        "pipeline": cfg["pipeline"]["name"],
        "order": list(order),
        "task": {
            "name": task["name"],
            **splits.identity(),  # source, sizes, and a digest of every split's inputs and labels
            "overlap": splits.overlap,
            "labels": list(splits.label_names),
            "metrics": task_metrics(task),
            "primary_metric": primary_metric(task),
        },
        "seed": int(cfg["seed"]),
        "git": git,
        **extra,
        "versions": library_versions(),
        # hub models: the commit each branch pointed to when this run loaded it
        "hub_commits": run_hub_commits(cfg),
        # The processor (and GPUs) the numbers came from: math libraries pick kernels per processor,
        # so the same run on another CPU type ends elsewhere (cached stages share this process's, as
        # it is in their key). dpq.pareto warns when the runs it merges or compares differ here.
        "hardware": hardware(),
        "cost_conditions": {
            **cfg["cost"],
            "flops_convention": final.get("flops_convention"),
            "latency_device": final.get("device"),
            "threads": final.get("threads"),
        },
        "stages": recs,
        # Spiral runs: the state after each round (its last record), so the trajectory is one list.
        "rounds": [
            r
            for i, r in enumerate(recs)
            if "round" in r and (i + 1 == len(recs) or recs[i + 1].get("round") != r["round"])
        ],
        "final": {"stage": recs[-1]["stage"], "model": role, "quantized": state.quantized, **final},
        "model_dir": str(model_dir) if model_dir else None,
        "wall_time_s": wall_time_s,  # this process's: a resumed run's earlier starts are not in it
        "resumed_after": resumed_after,
        "config": cfg,
    }


def completed(output_dir: Path) -> dict | None:
    """results.json of a run that already finished, else None."""
    import json

    try:
        payload = json.loads((Path(output_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return payload if payload.get("status") == "completed" else None


COLUMNS = [  # (header, metric key, format)
    ("stage", None, None),
    ("model", None, None),
    ("acc", "accuracy", "{:.4f}"),
    ("val acc", "val_accuracy", "{:.4f}"),
    ("sparsity", "sparsity", "{:.3f}"),
    ("params nz", "params_nonzero", "{:,}"),
    ("GFLOPs", "dense_gflops", "{:.4g}"),
    ("eff GFLOPs", "effective_gflops", "{:.4g}"),
    ("size MB", "size_bytes", None),
    ("lat ms", "latency_ms_median", "{:.2f}"),
    ("time s", None, None),
]


def columns(primary: str = "accuracy") -> list[tuple]:
    """The table's columns: accuracy, then the primary metric (test and validation) when it is another."""
    if primary == "accuracy":
        return COLUMNS
    at = [h for h, _, _ in COLUMNS].index("sparsity")
    return [
        *COLUMNS[:at],
        (primary, primary, "{:.4f}"),
        (f"val {primary}", f"val_{primary}", "{:.4f}"),
        *COLUMNS[at:],
    ]


def table_rows(records: list[dict], primary: str = "accuracy") -> list[list[str]]:
    rows = []
    for r in records:
        m = r["metrics"]
        row = []
        for header, key, fmt in columns(primary):
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


def deployed_caption(final: dict) -> str | None:
    """The exported model under the stage table, when the run exported one. The rows' ``lat ms`` times each
    stage's PyTorch model, in which a quantized stage simulates its integer arithmetic in float: the default
    experiment's 4-bit stage read 8.30 ms there against 3.68 ms for its float predecessor, while the ONNX
    Runtime model it deploys as ran at 1.51 ms (results.json had it; the table did not say)."""
    if final.get("onnx_latency_ms_median") is None:
        return None
    return (
        f"model/model.onnx in ONNX Runtime ({final.get('onnx_threads')} threads): test acc "
        f"{final['onnx_accuracy']:.4f} (the same prediction as the PyTorch model on "
        f"{final['onnx_agreement']:.2%} of the test examples), {final['onnx_size_bytes'] / 1e6:.4g} MB, "
        f"{final['onnx_latency_ms_median']:.2f} ms; the rows' lat ms time each stage's PyTorch model"
    )


def print_table(
    records: list[dict], title: str, primary: str = "accuracy", caption: str | None = None
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for header, _, _ in columns(primary):
        table.add_column(header, justify="left" if header in ("stage", "model") else "right")
    for row in table_rows(records, primary):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
