"""PyTorch speed of a ``packed`` model with dynamic int8 activations (``act_range=dynamic``):
the in-place no-grad fake quantizer against the straight-through version it replaced at
inference, and the float dense student, interleaved in one process (2 threads, sequence 64).

    OMP_WAIT_POLICY=PASSIVE python bench/packed_act_quant.py <deploy run> <dense run>

Asserts that both quantizers give identical logits before timing.
"""

import argparse
import json
import statistics as st
import time
from pathlib import Path

import torch

import dpq.quant.packed as packed
from dpq.checkpoints import load_model
from dpq.quant.affine import EPS

new = packed.fake_quantize_dynamic


def old(x):
    # fake_quantize_dynamic before 2026-12-04 (its training path, used at inference too)
    xd = x.detach().float()
    lo, hi = torch.clamp(xd.min(), max=0.0), torch.clamp(xd.max(), min=0.0)
    s = torch.clamp((hi - lo) / 255.0, min=EPS)
    zp = torch.clamp(torch.round(-lo / s), 0, 255)
    q = (torch.clamp(torch.round(xd / s) + zp, 0, 255) - zp) * s
    return q.to(x.dtype) + (x - x.detach())


def load(d):
    d = Path(d)
    cfg = json.load(open(d / "results.json"))["config"]
    return load_model(cfg["model"], cfg["task"], d / "model").eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "deploy_run", type=Path, help="a run trained with act_range=dynamic (its results.json and model/)"
    )
    ap.add_argument("dense_run", type=Path, help="the dense student's run")
    args = ap.parse_args()
    torch.set_num_threads(2)
    q, dense = load(args.deploy_run), load(args.dense_run)
    for b, n in ((1, 10), (32, 2)):
        ids = torch.randint(1000, 2000, (b, 64))
        mask = torch.ones(b, 64, dtype=torch.long)
        with torch.inference_mode():
            packed.fake_quantize_dynamic = old
            lo = q(input_ids=ids, attention_mask=mask).logits
            packed.fake_quantize_dynamic = new
            ln = q(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(lo, ln)
            t = {"old": [], "new": [], "dense": []}
            for _round in range(15):
                for k in t:
                    packed.fake_quantize_dynamic = old if k == "old" else new
                    m = dense if k == "dense" else q
                    m(input_ids=ids, attention_mask=mask)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        m(input_ids=ids, attention_mask=mask)
                    t[k].append((time.perf_counter() - t0) / n * 1e3)
        med = {k: st.median(v) for k, v in t.items()}
        ratio = st.median([a / b for a, b in zip(t["old"], t["new"])])
        print(
            f"batch {b}: median ms old {med['old']:.2f} new {med['new']:.2f} dense fp32 {med['dense']:.2f}; "
            f"old/new per-round median {ratio:.2f}x; new vs dense {med['dense'] / med['new']:.2f}x, "
            f"old vs dense {med['dense'] / med['old']:.2f}x; logits identical"
        )


if __name__ == "__main__":
    main()
