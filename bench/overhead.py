"""Framework overhead: time per training step of dpq's prune and QAT stages against a plain
Lightning step of the same model on the same data, in one process.

Usage::

    python bench/overhead.py                 # the default student (MiniLM-L3) on the default task
    python bench/overhead.py --tiny          # tiny random BERT: checks the script in seconds

A step is timed from ``on_train_batch_start`` to the end of every callback's
``on_train_batch_end`` (forward, backward, optimizer step, mask updates and re-application,
fake quantization), so data loading, which is the same for all, is left out. Medians over
``--steps`` steps after ``--warmup``; the plain step runs first and again last, so the spread
between those two runs says how noisy the machine was. Distillation is off (alpha 0) in all
runs: the KD term's cost is the teacher's, not the framework's. Writes
``bench/results/overhead.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time of each training step; appended last, so it closes after every other callback."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append((time.perf_counter() - self._t0) * 1e3)


class PlainModule(L.LightningModule):
    """The baseline: the same model, cross-entropy, AdamW -- what a user would write by hand."""

    def __init__(self, model: nn.Module, lr: float):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        out = self.model(**{k: v for k, v in batch.items() if k not in ("labels", "idx")})
        logits = getattr(out, "logits", out)
        return nn.functional.cross_entropy(logits, batch["labels"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dpq.core.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    args = ap.parse_args(argv)
    n = args.steps + args.warmup

    from omegaconf import OmegaConf, open_dict

    from dpq.data import ClassificationDataModule, load_task
    from dpq.models import build_model, load_tokenizer
    from dpq.run.context import RunContext
    from dpq.train import quiet_libraries, train

    quiet_libraries()
    # The stage cache off: a cached prune/quantize stage would be restored, not trained and timed.
    base = [
        "logger=none",
        "save_model=false",
        "cost.repeats=2",
        "cost.warmup=1",
        "stage_cache.enabled=false",
        *(["experiment=tiny", "trainer=cpu", "task.subsample=null"] if args.tiny else []),
        "pipeline.order=[prune,quantize]",
        "pipeline.stages.prune.alpha=0",
        "pipeline.stages.quantize.alpha=0",
        f"+pipeline.stages.prune.max_steps={n}",
        f"+pipeline.stages.quantize.max_steps={n}",
    ]
    cfg = compose(base)
    with open_dict(cfg):
        cfg.paths.output_dir = str(args.out.parent / "overhead_run")
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    task = cfg_dict["task"]
    L.seed_everything(0, verbose=False)

    # --- the plain Lightning baseline on the same data module and the same student ------------
    splits = load_task(task)
    tok = load_tokenizer(cfg_dict["teacher"]) if splits.kind == "text" else None
    data = ClassificationDataModule.for_task(splits, tok, task)
    teacher = (
        build_model(cfg_dict["teacher"], task, "teacher")
        if cfg_dict["model"].get("init") == "from_teacher"
        else None
    )
    student = build_model(cfg_dict["model"], task, "model", teacher=teacher)

    def plain_run() -> list[float]:
        timer = StepTimer()
        trainer = L.Trainer(
            max_steps=n,
            callbacks=[timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            gradient_clip_val=cfg_dict["trainer"].get("gradient_clip_val"),
            limit_val_batches=0,
        )
        trainer.fit(PlainModule(copy.deepcopy(student), 5e-5), datamodule=data)
        return timer.times

    plain_first = plain_run()

    # --- dpq's own stages, with a timer added to every stage's Trainer ------------------------
    timers: list[StepTimer] = []
    original = RunContext.make_trainer

    def with_timer(self, callbacks=(), **kw):
        if "max_epochs" in kw or "max_steps" in kw:  # a training fit, not an evaluation
            timers.append(StepTimer())
            callbacks = [*callbacks, timers[-1]]
        return original(self, callbacks, **kw)

    RunContext.make_trainer = with_timer
    try:
        train(cfg)
    finally:
        RunContext.make_trainer = original
    plain_last = plain_run()

    def med(times):
        return statistics.median(times[args.warmup :])

    prune_t, qat_t = timers[0].times, timers[1].times
    base_ms = statistics.median(plain_first[args.warmup :] + plain_last[args.warmup :])
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "tiny": args.tiny,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "batch_size": int(task["batch_size"]),
        "model": cfg_dict["model"]["name"],
        "task": task["name"],
        "plain_ms": base_ms,
        "plain_first_ms": med(plain_first),
        "plain_last_ms": med(plain_last),
        "prune_ms": med(prune_t),
        "qat_ms": med(qat_t),
        "prune_ratio": med(prune_t) / base_ms,
        "qat_ratio": med(qat_t) / base_ms,
        "goal_ratio": 1.15,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(
        f"plain {base_ms:.1f} ms/step (first {out['plain_first_ms']:.1f}, last {out['plain_last_ms']:.1f}); "
        f"prune {out['prune_ms']:.1f} ({out['prune_ratio']:.3f}x); QAT {out['qat_ms']:.1f} ({out['qat_ratio']:.3f}x)"
    )
    return out


if __name__ == "__main__":
    main()
