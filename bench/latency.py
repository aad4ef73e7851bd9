"""Measured latency of a study's final models, all in one process, interleaved.

Usage::

    python bench/latency.py bench/results/study                # one run per config (lowest seed)
    python bench/latency.py bench/results/study --batches 1 32 --seq-len 64
    python bench/latency.py --out latency.json <run folder> <run folder> ...   # any finished runs
    python bench/latency.py bench/results/study --device cuda --dtype bfloat16 --batches 1 32 256 --seq-len 128

Each run of the study measures its own latency at its end (``cost.latency``), minutes or hours
apart from the others: a busy neighbour process or a thermal change then lands on one config
and not another. Here every model is loaded from its run's ``model/`` folder (packed low-bit
weights and shrunk structures included, via :func:`dpq.checkpoints.load_model`) and timed in
rounds that cycle through all models, so noise hits each alike; the teacher is the dense run's
teacher architecture (its weights do not change its latency). Ratios to ``dq`` are the figures
to read; absolute milliseconds depend on the machine.

``--onnx`` adds the deployed side, all in the same rounds: each run's ``model/model.onnx``
(written at the end of every run; ``python -m dpq.export`` for older ones) in ONNX Runtime, and,
built here from the ``dense`` run's student, what a user gets for free -- ONNX Runtime fp32 of
``torch.onnx.export`` and ``onnxruntime.quantization.quantize_dynamic`` (per channel, int8) of
it -- with their test accuracy and file size. ONNX Runtime's idle threads sleep
(``allow_spinning=0``) and so do PyTorch's (``OMP_WAIT_POLICY=PASSIVE``): spinning pools of one
runtime otherwise steal the cores the other is being timed on.

Writes ``bench/results/latency.json`` when timing ``bench/results/study`` (else ``--out`` is needed) and
prints one table per batch size.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep (see --onnx)
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY_LATENCY = ROOT / "bench" / "results" / "latency.json"  # bench/study.py reads it into README
RUN_DIR = re.compile(r"^(?P<config>.+)-s(?P<seed>\d+)$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_runs(paths: list[Path]) -> dict[str, Path]:
    """name -> run folder. A study folder contributes one completed run per config (its lowest
    seed: the architecture, and so the latency, is the same on every seed); a run folder itself,
    named by its config (``dense-s42`` -> ``dense``, so ``--baseline dense`` finds it) unless two
    folders given share a config: then both keep their folder names (three seeds' models of one
    recipe are three rows, not one row silently holding the last)."""
    runs: dict[str, Path] = {}
    folders = [p for p in paths if (p / "results.json").exists()]
    configs = [m["config"] if (m := RUN_DIR.match(p.name)) else p.name for p in folders]
    for p, config in zip(folders, configs):
        status = json.loads((p / "results.json").read_text()).get("status")
        if status not in (None, "completed"):  # timed as asked, but its accuracy is not a finished run's
            print(f"{p}: status {status!r}, not completed (its accuracy and model are what it left)")
        name = config if configs.count(config) == 1 else p.name
        if name in runs and runs[name] != p:
            sys.exit(f"two run folders are both named {name!r}: {runs[name]} and {p}")
        runs[name] = p
    for p in paths:
        if (p / "results.json").exists():
            continue
        found = sorted(p.glob("*/results.json"))
        if not found:
            sys.exit(
                f"{p}: neither a run folder (results.json) nor a study folder (<config>-s<seed>/results.json)"
            )
        best: dict[str, tuple[int, Path]] = {}
        for f in found:
            m = RUN_DIR.match(f.parent.name)
            if (
                not m
                or json.loads(f.read_text()).get("status") != "completed"
                or not (f.parent / "model").is_dir()
            ):
                continue
            seed = int(m["seed"])
            if m["config"] not in best or seed < best[m["config"]][0]:
                best[m["config"]] = (seed, f.parent)
        seeds = sorted({seed for seed, _ in best.values()})
        if len(seeds) > 1:  # a config missing its lowest seed: its row's accuracy is another seed's
            print(
                f"{p}: rows from seeds {seeds}: "
                + ", ".join(f"{c} s{seed}" for c, (seed, _) in sorted(best.items()))
            )
        for c, (_, d) in best.items():
            if c in runs and runs[c] != d:  # a named run folder, or another study's pick: never replaced
                sys.exit(
                    f"{c!r} is both {runs[c]} and {d} (picked from the study folder {p}): give one "
                    "study folder, or run folders whose configs differ from the study's"
                )
            runs[c] = d
    if not runs:
        sys.exit(f"no completed run with a saved model/ folder under {', '.join(map(str, paths))}")
    return name_dense(runs)


def name_dense(runs: dict[str, Path]) -> dict[str, Path]:
    """The teacher row and the free ONNX Runtime baselines come from the run named ``dense``. A run
    folder as Hydra names it (``<time>_dense-<task>-<model>-s42``) is not: when no run is named
    ``dense``, the one run whose pipeline is ``dense`` (results.json) takes the name; with several,
    none does and :func:`main` says why the free baselines are missing."""
    if "dense" in runs:
        return runs
    dense = [n for n, d in runs.items() if pipeline_of(d) == "dense"]
    if len(dense) != 1:
        return runs
    print(f"{dense[0]}: its pipeline is dense, named 'dense' (teacher, free baselines, --baseline dense)")
    return {("dense" if n == dense[0] else n): d for n, d in runs.items()}


def pipeline_of(run: Path) -> str | None:
    try:
        res = json.loads((run / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return res.get("pipeline") or ((res.get("config") or {}).get("pipeline") or {}).get("name")


def paired_speedup(base: list[float], model: list[float], per_round: int) -> dict:
    """How many times faster ``model`` is than ``base``, paired by round, with a 95% interval.

    Both lists are per-call times from :func:`dpq.cost.interleaved_latency`: ``per_round`` calls of
    each model per round, so a round is one slice of the machine's state that hit both alike. The
    per-round ratio of medians cancels what drifts between rounds (another process, the clock);
    their geometric mean and Student's t interval on the log ratios say how sure "2x" is, where a
    ratio of two overall medians would not (it moved by 10% between runs on the same models here).
    The interval needs two rounds or more."""
    from dpq.pareto.stats import mean_interval

    if len(base) != len(model) or not base or per_round < 1 or len(base) % per_round:
        raise ValueError(f"paired times need equal lengths divisible by per_round={per_round}")
    rounds = len(base) // per_round
    logs = [
        math.log(
            statistics.median(base[i * per_round : (i + 1) * per_round])
            / statistics.median(model[i * per_round : (i + 1) * per_round])
        )
        for i in range(rounds)
    ]
    st = mean_interval(logs)
    exp = lambda v: math.exp(v) if v is not None else None  # noqa: E731
    return {
        "geomean": exp(st["mean"]),
        "ci95": [exp(st["ci_low"]), exp(st["ci_high"])],
        "rounds": rounds,
        "min_round": math.exp(min(logs)),
    }


def _speedup_text(p: dict) -> str:
    lo, hi = p["ci95"]
    return f"{p['geomean']:.2f}x" + (f" [{lo:.2f}-{hi:.2f}]" if lo is not None else "")


def text_batch(vocab: int, batch: int, seq_len: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The timing input: random token ids (seed 0), no padding, one segment."""
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq_len), generator=g).to(device),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(batch, seq_len, dtype=torch.long, device=device),
    }


def iqr(values: list[float]) -> list[float]:
    """[first, third] quartile; both the value itself when there is one."""
    return statistics.quantiles(values, n=4)[::2] if len(values) > 1 else [values[0], values[0]]


def load_models(runs: dict[str, Path], teacher: bool) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    from dpq import cost
    from dpq.checkpoints import load_model
    from dpq.models import build_model

    models, info = {}, {}
    for name, d in runs.items():
        res = json.loads((d / "results.json").read_text())
        cfg = res["config"]
        if teacher and name == "dense" and "teacher" not in models:
            models["teacher"] = build_model(cfg["teacher"], cfg["task"], "teacher").eval()
            rec = next(s["metrics"] for s in res["stages"] if s["kind"] == "teacher")
            info["teacher"] = {
                "run": str(d),
                "accuracy": rec["accuracy"],
                "effective_gflops": rec.get("effective_gflops"),
                "params_total": cost.parameter_counts(models["teacher"])["params_total"],
            }
        models[name] = load_model(cfg["model"], cfg["task"], d / "model").eval()
        info[name] = {
            "run": str(d),
            "accuracy": res["final"]["accuracy"],
            "effective_gflops": res["final"].get("effective_gflops"),
            "size_bytes": res["final"].get("size_bytes"),
            "latency_ms_in_run": res["final"].get("latency_ms_median"),
            "params_total": cost.parameter_counts(models[name])["params_total"],
        }
    return models, info


def free_baselines(dense_run: Path, work: Path) -> tuple[dict, dict]:
    """ONNX Runtime fp32 and ``quantize_dynamic`` int8 of the dense run's student, with their test accuracy."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dpq.data import ClassificationDataModule, load_task, recorded_task
    from dpq.export.evaluate import OrtModel, predictions
    from dpq.export.onnx import _float_copy, _torch_export, ort_session

    res = json.loads((dense_run / "results.json").read_text())
    cfg = res["config"]
    from dpq.checkpoints import load_model

    student = load_model(cfg["model"], cfg["task"], dense_run / "model").eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense_run / "model")
    task = recorded_task(cfg["task"])  # an older run's keys in today's names
    splits = load_task(task)
    if differs := splits.changed_since(res.get("task")):  # the baselines' accuracy beside the runs' own
        raise SystemExit(f"{dense_run}: the task's examples changed since the run ({differs}); restore them")
    data = ClassificationDataModule.for_task(splits, tok, task, group_by_length=False)
    test = list(data.test_dataloader())
    fp32, int8 = work / "dense_fp32.onnx", work / "dense_int8_dynamic.onnx"
    from dpq.core.nn import model_inputs

    _torch_export(_float_copy(student), model_inputs(test[0]), fp32, 17)  # what torch.onnx.export gives
    quantize_dynamic(
        str(fp32),
        str(int8),
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": 1},
    )  # 1 = float: the raw export lacks some type info
    models, info = {}, {}
    for name, path in (("dense ORT fp32", fp32), ("dense ORT int8 dynamic", int8)):
        m = OrtModel(ort_session(path, torch.get_num_threads()))
        pred, labels = predictions(m, test)
        models[name] = m
        info[name] = {
            "run": str(dense_run),
            "accuracy": float((pred == labels).mean()),
            "size_bytes": path.stat().st_size,
            "effective_gflops": None,
            "runtime": "onnxruntime",
        }
    return models, info


def onnx_models(runs: dict[str, Path]) -> tuple[dict, dict]:
    """Every run's exported ``model/model.onnx`` in ONNX Runtime, with the accuracy it measured there."""
    from dpq.export.evaluate import OrtModel
    from dpq.export.onnx import ort_session

    models, info = {}, {}
    for name, d in runs.items():
        path = d / "model" / "model.onnx"
        final = json.loads((d / "results.json").read_text())["final"]
        if not path.exists() or "onnx_accuracy" not in final:
            print(f"  (no model.onnx measured in {d}: run python -m dpq.export {d})")
            continue
        models[f"{name} ORT"] = OrtModel(ort_session(path, torch.get_num_threads()))
        info[f"{name} ORT"] = {
            "run": str(d),
            "accuracy": final["onnx_accuracy"],
            "size_bytes": path.stat().st_size,
            "agreement": final.get("onnx_agreement"),
            "runtime": "onnxruntime",
            "effective_gflops": final.get("effective_gflops"),
        }
    return models, info


class Parser(argparse.ArgumentParser):
    """argparse, with a hint where a common ordering of the arguments leaves no run folder."""

    def error(self, message):
        # --baseline and --batches take several values: they eat the folders that follow them
        if "required: paths" in message:
            message += (
                " (folders written after --baseline or --batches are read as their values: give the folders "
                "first, or end those values with --)"
            )
        super().error(message)


def main(argv=None) -> dict:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", type=Path, nargs="+", help="study folder(s) and/or run folders")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument(
        "--seq-len",
        type=int,
        default=64,
        help="the study's own latency uses 64 (conf/train.yaml cost.seq_len)",
    )
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (calls are synchronized)")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="float dtype the models run in (bfloat16 casts weights, scales and activations; "
        "low-bit codes stay integers)",
    )
    ap.add_argument(
        "--baseline",
        nargs="+",
        default=["dq"],
        help="ratios are baseline latency / model latency (speedup); with several names, every model "
        "gets a speedup against each (e.g. --baseline dense 'dense ORT int8 dynamic')",
    )
    ap.add_argument("--no-teacher", action="store_true")
    ap.add_argument(
        "--onnx",
        action="store_true",
        help="add every run's model.onnx and the free ONNX Runtime "
        "baselines of the dense student (see above)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where the JSON goes (default {STUDY_LATENCY.relative_to(ROOT)}, the study's, only when timing "
        "bench/results/study: any other set of runs names its own file)",
    )
    args = ap.parse_args(argv)
    if args.out is None:
        # the study's committed file feeds README's measured table (bench/study.py): other runs must not
        # overwrite it
        if any(p.resolve() != (ROOT / "bench" / "results" / "study").resolve() for p in args.paths):
            ap.error(
                f"--out is needed: the default {STUDY_LATENCY.relative_to(ROOT)} is bench/results/study's"
            )
        args.out = STUDY_LATENCY
    from dpq import cost

    runs = pick_runs(args.paths)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: no CUDA device here (torch {torch.__version__})")
    models, info = load_models(runs, teacher=not args.no_teacher)
    if not args.no_teacher and "teacher" not in models:
        print("no teacher row: the teacher is read from the run named 'dense', and none is")
    models = {k: m.to(device=args.device, dtype=DTYPES[args.dtype]) for k, m in models.items()}
    vocab = min(int(getattr(m.config, "vocab_size", 0) or 0) for m in models.values())
    if args.onnx:
        work = Path(tempfile.mkdtemp(prefix="dpq-latency-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)  # the baseline .onnx files: tens of MB
        if "dense" in runs:
            more, more_info = free_baselines(runs["dense"], work)
            models.update(more)
            info.update(more_info)
        else:
            dense = [n for n, d in runs.items() if pipeline_of(d) == "dense"]
            print(
                "--onnx: no free ONNX Runtime baselines: they are built from one dense run "
                + (
                    f"and several are given ({', '.join(dense)})"
                    if dense
                    else "(a pipeline=dense run folder)"
                )
            )
        more, more_info = onnx_models(runs)
        models.update(more)
        info.update(more_info)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "bench/latency.py", *(argv or sys.argv[1:])]),  # re-runnable
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seq_len": args.seq_len,
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "warmup": args.warmup,
        "baseline": args.baseline[0],
        "baselines": args.baseline,
        "models": info,
        "batches": {},
    }
    for b in args.batches:
        x = text_batch(vocab, b, args.seq_len, args.device)
        t = cost.interleaved_latency(models, x, args.rounds, args.per_round, args.warmup)
        med = {k: statistics.median(v) for k, v in t.items()}
        bases = [n for n in args.baseline if n in t]  # a study without dq has no default baseline
        for n in args.baseline:
            if n not in t:
                print(f"  (--baseline {n!r} is not among the timed models {sorted(t)}: no ratios to it)")
        out["batches"][str(b)] = {
            k: {
                "latency_ms_median": med[k],
                "latency_ms_iqr": iqr(v),
                **{f"speedup_vs_{n}": med[n] / med[k] for n in bases},
                **{f"paired_speedup_vs_{n}": paired_speedup(t[n], v, args.per_round) for n in bases},
            }
            for k, v in t.items()
        }
        print(
            f"batch {b}, sequence {args.seq_len}, {out['device']}, {args.dtype}, {out['threads']} threads: "
            f"median of {args.rounds * args.per_round} calls"
        )
        head = "".join(f" {'vs ' + n[:22]:>26}" for n in bases)
        print(f"  {'model':<28} {'accuracy':>8} {'MB':>7} {'ms':>9} {'IQR ms':>15}{head}")
        for k, r in out["batches"][str(b)].items():
            lo, hi = r["latency_ms_iqr"]
            mb = f"{info[k]['size_bytes'] / 1e6:.1f}" if info[k].get("size_bytes") else "-"
            cols = "".join(f" {_speedup_text(r[f'paired_speedup_vs_{n}']):>26}" for n in bases)
            print(
                f"  {k:<28} {info[k]['accuracy']:>8.4f} {mb:>7} {r['latency_ms_median']:>9.2f} {lo:>7.2f}-{hi:<7.2f}"
                f"{cols}"
            )
        print("  (speedups: geometric mean of per-round ratios [95% interval])")
        if args.dtype != "float32":
            print(
                f"  (accuracy: each run's results.json, measured as trained; not re-measured in {args.dtype})"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
