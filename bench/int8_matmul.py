"""cpu_int8's int8 matrix product against float32, on the default student's layer shapes.

``python bench/int8_matmul.py [--out bench/results/int8_matmul.json]``

Times, interleaved in one process (2 threads by default), ``F.linear`` in float32,
:func:`dpq.quant.cpu_int8.int8_matmul` (dynamic per-row int8 inputs times int8 weight codes, with
the kernel :func:`~dpq.quant.cpu_int8.int_mm` picks for this CPU) and the bare integer product in
``torch._int_mm`` (oneDNN; what the backend ran on every CPU before it picked kernels) for the
MiniLM-L3 student's linears (hidden 384, FFN 1536, and the FFN half-width a 50% neuron prune leaves)
at 64 tokens (batch 1, sequence 64) and 2048 (batch 32). Prints the median ms of each and the
speedups over float; the kernel the CPU runs is recorded with them.

``--run RUN_DIR`` (a finished run whose final model is float, e.g. the dense student) also times the
whole model at batch 1 and 32, sequence 64: float32 against copies of it with every encoder linear
post-training-quantized to 8 bits (min-max, per channel) in ``cpu_int8`` and in ``packed``. Only
latency is compared there (the copies are not evaluated).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(384, 384), (384, 1536), (1536, 384), (384, 768), (768, 384)]  # (in, out)
TOKENS = [64, 2048]


def main(argv=None) -> dict:
    from dpq.quant import cpu_int8

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "int8_matmul.json")
    ap.add_argument("--run", type=Path, default=None, help="also time this run's whole model (see above)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, generator=g) * 0.05
        scale = w.abs().amax(1) / 127
        codes_t = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8).t().contiguous()
        for m in TOKENS:
            x = torch.randn(m, k, generator=g)
            xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
            cf = codes_t.float()
            calls = {
                "float32": lambda x=x, w=w: F.linear(x, w),
                "int8": lambda x=x, c=codes_t, s=scale, cf=cf: cpu_int8.int8_matmul(x, c, s, None, None, cf),
                "torch_int_mm": lambda xq=xq, c=codes_t: torch._int_mm(xq, c),
            }
            times = {name: [] for name in calls}
            with torch.inference_mode():
                for f in calls.values():
                    for _ in range(3):
                        f()
                for _ in range(args.rounds):
                    for name, f in calls.items():
                        for _ in range(args.per_round):
                            t0 = time.perf_counter()
                            f()
                            times[name].append((time.perf_counter() - t0) * 1e3)
            med = {name: statistics.median(t) for name, t in times.items()}
            rows.append(
                {
                    "in": k,
                    "out": n,
                    "tokens": m,
                    "float32_ms": med["float32"],
                    "int8_ms": med["int8"],
                    "int8_speedup": med["float32"] / med["int8"],
                    "torch_int_mm_ms": med["torch_int_mm"],
                    "torch_int_mm_speedup": med["float32"] / med["torch_int_mm"],
                }
            )
            print(
                f"{k:5d} -> {n:5d}, {m:5d} tokens: float32 {med['float32']:8.3f} ms, int8 {med['int8']:8.3f} ms, "
                f"int8 speedup {med['float32'] / med['int8']:.2f}x; the product alone in torch._int_mm "
                f"{med['torch_int_mm']:8.3f} ms ({med['float32'] / med['torch_int_mm']:.2f}x)",
                flush=True,
            )
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(
            ["python", "bench/int8_matmul.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "torch": torch.__version__,
        "threads": args.threads,
        "kernel": cpu_int8.int8_kernel(),
        "rows": rows,
    }
    if args.run is not None:
        out["model"] = whole_model(args.run, args)
    print(f"kernel: {out['kernel']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


def whole_model(run: Path, args) -> dict:
    """Float32 vs 8-bit ``cpu_int8`` vs 8-bit ``packed`` copies of ``run``'s model, interleaved."""
    import copy

    from dpq import cost
    from dpq.checkpoints import load_model
    from dpq.data import recorded_task
    from dpq.models import load_tokenizer
    from dpq.quant import QuantConfig, convert_

    res = json.loads((run / "results.json").read_text())
    cfg = res["config"]
    task = recorded_task(cfg["task"])
    model = load_model(cfg["model"], task, run / "model").eval()
    targets = cfg["model"].get("quant_targets") or cfg["model"]["prune_targets"]
    models = {"float32": model}
    for backend in ("cpu_int8", "packed"):
        m = copy.deepcopy(model)
        convert_(m, cfg=QuantConfig(bits=8, granularity="per_channel", targets=targets), backend=backend)
        models[f"8-bit {backend}"] = m.eval()
    tok = load_tokenizer(cfg["teacher"])
    out = {"run": str(run), "seq_len": 64, "batches": {}}
    for batch in (1, 32):
        inputs = cost.example_inputs_for("text", batch, 64, vocab_size=len(tok))
        times = cost.interleaved_latency(models, inputs, rounds=args.rounds, per_round=args.per_round)
        med = {k: statistics.median(v) for k, v in times.items()}
        out["batches"][str(batch)] = {
            k: {"ms": v, "speedup_vs_float32": med["float32"] / v} for k, v in med.items()
        }
        print(
            f"whole model, batch {batch}: "
            + ", ".join(f"{k} {v:.2f} ms ({med['float32'] / v:.2f}x)" for k, v in med.items()),
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
