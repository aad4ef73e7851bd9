"""Weight-only 8-bit codes in ONNX Runtime: the integer kernels (per channel) against exact MatMulNBits (per group).

Usage::

    python bench/weight_only_export.py <dense run folder> [--bits 8] [--group 128] [--batches 1 32] [--rounds 10]

A model trained with 8-bit weights and float activations (``act_bits`` unset) computes
``x @ (s * (q - z))`` on float ``x``. Its export takes one of two forms, by the codes' granularity:
per-channel codes go to ONNX Runtime's integer kernels (``DynamicQuantizeMatMul``, ``QAttention``),
which round the activations to uint8 per tensor on the fly -- a rounding the model never saw, so
``onnx_agreement`` is below 1; per-group codes go to ``MatMulNBits`` with ``bits=8`` on float
activations, exactly what the model computes. Here the dense run's student is quantized both ways by
min-max (no training: the codes are the weights' rounding, enough to time the kernels and see how far
each export moves the predictions), exported with the default options, and timed in the same
interleaved rounds as the free baselines of ``bench/latency.py`` (ONNX Runtime fp32 and
``quantize_dynamic`` int8 of the dense student), with each export's test accuracy and its agreement
with the PyTorch model it came from.

Writes ``bench/results/weight_only_export.json`` (or ``--out``) and prints a table per batch size.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import free_baselines, iqr, paired_speedup, text_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def quantized_student(run: Path, cfg: dict, bits: int, granularity: str, group: int):
    """The run's student with its quantization targets min-max quantized to ``bits``, weight-only."""
    from dpq.checkpoints import load_model
    from dpq.quant import QuantConfig, convert_, prepare_qat_

    model = load_model(cfg["model"], cfg["task"], run / "model").eval()
    qcfg = QuantConfig(
        bits=bits, granularity=granularity, group_size=group, targets=cfg["model"]["quant_targets"]
    )
    convert_(model, backend="packed", names=prepare_qat_(model, qcfg))
    return model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished pipeline=dense run (results.json, model/)")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--group", type=int, default=128, help="the per_group model's group (MatMulNBits block)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "weight_only_export.json")
    args = ap.parse_args(argv)
    from dpq import cost
    from dpq.core.nn import model_inputs
    from dpq.data import ClassificationDataModule, load_task, recorded_task
    from dpq.export import OnnxOptions, export_onnx
    from dpq.export.evaluate import OrtModel, predictions
    from dpq.export.onnx import ort_session

    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="dpq-weight-only-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the baseline .onnx files: tens of MB
    models, info = free_baselines(args.run, work)
    cfg = json.loads((args.run / "results.json").read_text())["config"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.run / "model")
    task = recorded_task(cfg["task"])
    data = ClassificationDataModule.for_task(load_task(task), tok, task, group_by_length=False)
    test = list(data.test_dataloader())
    labels = None
    for gran in ("per_channel", "per_group"):
        student = quantized_student(args.run, cfg, args.bits, gran, args.group)
        want, labels = predictions(student, test)
        name = f"{args.bits}-bit {gran}" + (f" {args.group}" if gran == "per_group" else "")
        info[f"{name} PyTorch"] = {"accuracy": float((want == labels).mean())}
        report = export_onnx(
            student, model_inputs(test[0]), work / f"{gran}.onnx", OnnxOptions(threads=threads)
        )
        m = OrtModel(ort_session(report.path, threads))
        pred, _ = predictions(m, test)
        models[f"{name} ORT"] = m
        info[f"{name} ORT"] = {
            "accuracy": float((pred == labels).mean()),
            "agreement": float((pred == want).mean()),
            "max_abs_logit_diff": report.max_abs_logit_diff,
            "size_bytes": report.size_bytes,
            "ops": report.ops,
            "int8_layers": len(report.int8_layers),
            "nbits_layers": len(report.nbits_layers),
            "runtime": "onnxruntime",
        }
    vocab = int(student.config.vocab_size)
    bases = ["dense ORT fp32", "dense ORT int8 dynamic"]
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "bench/weight_only_export.py", *(argv or sys.argv[1:])]),
        "threads": threads,
        "torch": torch.__version__,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "models": info,
        "batches": {},
    }
    for b in args.batches:
        t = cost.interleaved_latency(
            models, text_batch(vocab, b, args.seq_len), args.rounds, args.per_round, args.warmup
        )
        out["batches"][str(b)] = {
            k: {
                "latency_ms_median": statistics.median(v),
                "latency_ms_iqr": iqr(v),
                **{f"paired_speedup_vs_{n}": paired_speedup(t[n], v, args.per_round) for n in bases},
            }
            for k, v in t.items()
        }
        print(
            f"batch {b}, sequence {args.seq_len}, {threads} threads, median of {args.rounds * args.per_round} calls"
        )
        for k, r in out["batches"][str(b)].items():
            s = [r[f"paired_speedup_vs_{n}"] for n in bases]
            print(
                f"  {k:<24} acc {info[k]['accuracy']:.4f}  agree {info[k].get('agreement', float('nan')):.4f}  "
                f"{info[k]['size_bytes'] / 1e6:5.1f} MB  {r['latency_ms_median']:7.2f} ms  "
                + "  ".join(
                    f"{p['geomean']:.2f}x [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] vs {n}"
                    for p, n in zip(s, bases)
                )
            )
    for k, v in info.items():
        if k.endswith("PyTorch"):
            print(f"  {k}: test accuracy {v['accuracy']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
