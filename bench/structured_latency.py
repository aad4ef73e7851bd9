"""Measured speed of a structurally shrunk student against its dense architecture, one process.

Usage::

    python bench/structured_latency.py <run folder of a heads/neurons prune run> [--batches 1 32] [--seq-len 64]

The run folder is what ``python -m dpq.train pipeline=dp pipeline.stages.prune.granularity=heads+neurons``
writes (``results.json``, ``model/``, ``.hydra/config.yaml``). The dense student is rebuilt
from the run's own config (same architecture as the distilled student before pruning; its
weight values do not change dense latency). Both models are timed in the same process,
interleaved in rounds so that machine noise hits both alike, with the same inputs; the
speedup is the ratio of medians and is compared with the fvcore FLOP ratio.

Writes ``bench/results/structured_latency.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def dense_student(cfg: dict):
    from dpq.models import build_model

    teacher = None
    if cfg["model"].get("init") == "from_teacher":
        teacher = build_model(cfg["teacher"], cfg["task"], "teacher")
    return build_model(cfg["model"], cfg["task"], "model", teacher=teacher).eval()


def default_config() -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from dpq.core.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    return OmegaConf.to_container(cfg, resolve=True)


def shrink_by_magnitude(dense, sparsity: float):
    """A copy of ``dense`` with ``sparsity`` of the heads and FFN neurons of every layer removed (by L2 norm)."""
    import copy

    from dpq.prune import structured

    model = copy.deepcopy(dense)
    sets = structured.find_groups(model, "heads+neurons")
    scores = {n: model.get_submodule(n).weight.abs() for g in sets for n in g.modules}
    keep = structured.select_groups(sets, scores, sparsity)
    structured.shrink_(model, sets, keep)
    return model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, nargs="?", help="run folder; omit with --shape-only")
    ap.add_argument(
        "--shape-only",
        type=float,
        metavar="SPARSITY",
        default=None,
        help="no run: shrink the default dense student's heads and neurons by magnitude to this "
        "fraction (untrained, so speed only; accuracies are not measured)",
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "structured_latency.json")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from dpq import cost
    from dpq.checkpoints import load_model

    if args.shape_only is not None:
        results, cfg = None, default_config()
        dense = dense_student(cfg)
        shrunk = shrink_by_magnitude(dense, args.shape_only)
    else:
        results = json.loads((args.run / "results.json").read_text())
        cfg = results.get("config")  # the resolved config the run used
        if cfg is None:
            cfg = OmegaConf.to_container(OmegaConf.load(args.run / ".hydra" / "config.yaml"), resolve=False)
        shrunk = load_model(cfg["model"], cfg["task"], args.run / "model").eval()
        if not getattr(shrunk.config, "dpq_structure", None):
            sys.exit(f"{args.run}: the saved model was not structurally shrunk (no config.dpq_structure)")
        dense = dense_student(cfg)
    vocab = int(dense.config.vocab_size)
    stages = results["stages"] if results else []
    dense_rec = next((r for r in stages if r["kind"] == "distill"), None)
    out = {
        "run": str(args.run) if results else f"shape-only {args.shape_only}",
        "threads": torch.get_num_threads(),
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "warmup": args.warmup,
        "accuracy_dense": dense_rec["metrics"]["accuracy"] if dense_rec else None,
        "accuracy_shrunk": results["final"]["accuracy"] if results else None,
        "structure": next((r.get("structure") for r in stages if r.get("structure")), None),
        "params_dense": cost.parameter_counts(dense)["params_total"],
        "params_shrunk": cost.parameter_counts(shrunk)["params_total"],
        "batches": {},
    }
    for b in args.batches:
        g = torch.Generator().manual_seed(0)
        x = {
            "input_ids": torch.randint(0, vocab, (b, args.seq_len), generator=g),
            "attention_mask": torch.ones(b, args.seq_len, dtype=torch.long),
        }
        f_dense = cost.flops(dense, {"input_ids": x["input_ids"]})["dense_gflops"]
        f_shrunk = cost.flops(shrunk, {"input_ids": x["input_ids"]})["dense_gflops"]
        t = cost.interleaved_latency(
            {"dense": dense, "shrunk": shrunk}, x, args.rounds, args.per_round, args.warmup
        )
        md, ms = statistics.median(t["dense"]), statistics.median(t["shrunk"])
        out["batches"][b] = {
            "gflops_dense": f_dense,
            "gflops_shrunk": f_shrunk,
            "flop_ratio": f_dense / f_shrunk,
            "latency_ms_dense": md,
            "latency_ms_shrunk": ms,
            "speedup": md / ms,
            "speedup_over_flop_ratio": (md / ms) / (f_dense / f_shrunk),
            "latency_ms_dense_iqr": statistics.quantiles(t["dense"], n=4)[::2],
            "latency_ms_shrunk_iqr": statistics.quantiles(t["shrunk"], n=4)[::2],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    if results:
        print(f"accuracy dense {out['accuracy_dense']:.4f} -> shrunk {out['accuracy_shrunk']:.4f}")
    print(f"params {out['params_dense']:,} -> {out['params_shrunk']:,}; threads {out['threads']}")
    print(
        f"{'batch':>5} {'GFLOPs dense':>13} {'shrunk':>8} {'FLOP ratio':>10} {'ms dense':>9} {'ms shrunk':>9} "
        f"{'speedup':>8} {'speedup/FLOP ratio':>18}"
    )
    for b, r in out["batches"].items():
        print(
            f"{b:>5} {r['gflops_dense']:>13.3f} {r['gflops_shrunk']:>8.3f} {r['flop_ratio']:>10.2f} "
            f"{r['latency_ms_dense']:>9.2f} {r['latency_ms_shrunk']:>9.2f} {r['speedup']:>8.2f} "
            f"{r['speedup_over_flop_ratio']:>18.2f}"
        )
    return out


if __name__ == "__main__":
    main()
