"""Run an ordered list of stages on one student, recording a result after each.

:class:`Runner` owns the stage loop: it re-seeds every stage (``seed + index``), runs it on the
passive :class:`~dpq.run.state.State` through the run's services
(:class:`~dpq.run.context.RunContext`), checks the run after it (:mod:`dpq.run.integrity`)
and saves a snapshot (:mod:`dpq.run.snapshot`), so a killed run continues where it stopped and
ends as if it never had. With ``stage_cache.enabled`` the longest pipeline prefix another run
already computed is restored from :mod:`dpq.run.stage_cache` instead of retrained. At the end
(:meth:`Runner.finish`) the final model is saved, reloaded and re-evaluated, and results.json
is written.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path

import lightning as L
from torch import nn

from dpq.core.distributed import (
    barrier,
    is_global_zero,
    rank_zero_decides,
    trainer_world_size,
)
from dpq.core.errors import IntegrityError, TrainingDiverged
from dpq.core.files import link_file, write_dir_atomic, write_json_atomic
from dpq.metrics import primary_metric
from dpq.models import save_model
from dpq.run import integrity, records, resume, snapshot, stage_cache
from dpq.run.context import RunContext
from dpq.run.state import State
from dpq.stages import Stage

log = logging.getLogger(__name__)


def lacking(missing: list[str]) -> str:
    """What a final record lacks, and why when it is an ONNX Runtime figure (the export failed)."""
    onnx = any(m.startswith("onnx_") for m in missing)
    return f"the final record lacks {', '.join(missing)}" + (
        " (the ONNX export failed: results.json's onnx_export.error)" if onnx else ""
    )


class Runner:
    def __init__(self, ctx: RunContext, state: State | None = None):
        self.ctx, self.state = ctx, state or State()
        cfg = ctx.cfg
        ck = dict(cfg.get("checkpoint") or {})
        self.checkpointing = bool(ck.get("enabled", True))
        self.keep_snapshots = int(ck.get("keep_snapshots", 2))
        self.integrity = bool(cfg.get("integrity", True))
        self.checkpoints = resume.checkpoints_dir(ctx.output_dir)
        self.order: list[str] = []
        self.next_stage = 0  # run() starts here: 0, or the stage after a loaded snapshot
        self.last_snapshot: snapshot.Snapshot | None = None
        self._teacher_snapshot: tuple[nn.Module, snapshot.Snapshot] | None = (
            None  # a snapshot holding this teacher
        )
        self._kind: str | None = None  # kind of the current stage (for snapshot manifests)
        self._unpublishable: str | None = None  # why a resumed run must not publish to the stage cache

    # ---- the stage loop ---------------------------------------------------------------------
    def run(self, stages: list[Stage]) -> None:
        """Run the stages in order -- after :meth:`resume`, only those after the snapshot's stage.

        After each stage: the integrity checks (``integrity``), then a snapshot in
        ``checkpoints/stage_<i>_<name>/`` (``checkpoint.enabled``). With ``stage_cache.enabled``
        (and not resuming) the longest pipeline prefix another run already computed with the same
        configuration is restored from the cache instead of retrained, and each newly run stage
        is published there; a stage that another process is building is waited for, then reused.
        """
        cfg, seed = self.ctx.cfg, int(self.ctx.cfg["seed"])
        self.order = [s.name for s in stages]
        sc = cfg.get("stage_cache") or {}
        try:
            if (
                sc.get("enabled")
                and self._unpublishable
                and self.next_stage == 0
                and self.last_snapshot is None
            ):
                log.info("stage cache: not used by this resumed run: %s", self._unpublishable)
            if (
                not sc.get("enabled")
                or self.next_stage > 0
                or self.last_snapshot is not None
                or self._unpublishable
            ):
                for i, stage in enumerate(stages):
                    if i >= self.next_stage:
                        self._run_stage(i, stage, seed)
                return
            self._run_cached(stages, seed, stage_cache.StageCache(sc["dir"]))
        finally:
            self.ctx.stage_dir = None

    def _run_cached(self, stages: list[Stage], seed: int, cache: stage_cache.StageCache) -> None:
        splits = self.ctx.data.splits
        # the examples themselves: a file edited in place or a hub dataset's new revision is another key
        data = {"data_source": splits.source, "data_sizes": splits.sizes(), "data_content": splits.content}
        keys = stage_cache.pipeline_keys(self.ctx.cfg, data)
        distributed = trainer_world_size(self.ctx.cfg["trainer"]) > 1
        if is_global_zero() and cache.root.is_dir() and (line := cache.stale_summary()):
            log.info("%s", line)  # never used: their keys cover the code that built them
        n = rank_zero_decides(json.dumps(keys), lambda: cache.longest_prefix(keys)[0], cache.root)
        if n and not self._restore_cached(cache, keys[n - 1], stages):
            n = 0
        for i in range(n, len(stages)):
            meta = {"stages": self.order[: i + 1]}
            if (
                distributed
            ):  # every rank runs every remaining stage; rank 0 publishes (no collective under a lock)
                self._run_stage(i, stages[i], seed)
                if is_global_zero():
                    cache.build(keys[i], self._publish, meta)
                continue

            def build(d: Path, i: int = i) -> None:
                self._run_stage(i, stages[i], seed)
                self._publish(d)

            _, built = cache.get_or_build(keys[i], build, meta)
            if not built and not self._restore_cached(cache, keys[i], stages):
                self._run_stage(i, stages[i], seed)

    def _run_stage(self, i: int, stage: Stage, seed: int) -> None:
        # Re-seed per stage: a stage's result must not depend on how much randomness earlier
        # stages drew (a cached teacher draws none), so a warm run reproduces a cold one --
        # and a resumed run, which starts from a snapshot, the uninterrupted one.
        L.seed_everything(seed + i, workers=True, verbose=False)
        state = self.state
        state.stage_index, state.stage_name, self._kind = i, stage.name, stage.kind
        self.ctx.stage_dir = (
            snapshot.stage_dir(self.checkpoints, i, stage.name) if self.checkpointing else None
        )
        student = state.student
        before = (
            integrity.layer_sparsity(student, list(state.masks))
            if student is not None and state.masks
            else {}
        )
        self.ctx.begin_stage()
        stage.run(state, self.ctx)
        if self.integrity:
            self.check_stage(stage, before)
        if self.ctx.stage_dir is not None and is_global_zero():  # DDP: every rank holds the same state
            self.save_snapshot(self.ctx.stage_dir, stage.kind)
            self._drop_old_checkpoints()

    def check_stage(self, stage: Stage, sparsity_before: dict) -> None:
        """No NaN/Inf weights, every pruned weight still zero, no layer less sparse than before the stage."""
        state = self.state
        last_good = str(self.last_snapshot.directory) if self.last_snapshot is not None else None
        for model in (state.student, state.teacher if stage.trains_teacher else None):
            if model is not None:
                integrity.check_finite(model, stage.name, last_good)
        if state.student is not None:
            integrity.check_masks_hold(state.student, state.masks, stage.name)
            integrity.check_sparsity_kept(
                sparsity_before, integrity.layer_sparsity(state.student, sparsity_before), stage.name
            )

    # ---- the stage cache ------------------------------------------------------------------------
    def _publish(self, directory: Path) -> None:
        """Fill a stage-cache entry: hard-link the snapshot just written (else write one there)."""
        snap = self.last_snapshot
        if snap is not None and snap.stage_index == self.state.stage_index and snap.directory.exists():
            for rel in snap.manifest["files"]:
                link_file(snap.directory / rel, Path(directory) / rel)
            shutil.copy2(snap.directory / snapshot.MANIFEST, Path(directory) / snapshot.MANIFEST)
        else:
            kept = (self.last_snapshot, self._teacher_snapshot)
            self.save_snapshot(directory, self._kind)
            self.last_snapshot, self._teacher_snapshot = kept

    def _restore_cached(self, cache: stage_cache.StageCache, key: str, stages: list[Stage]) -> bool:
        try:
            with cache.reading(key) as entry:  # `python -m dpq.stage_cache prune` skips an entry being read
                if entry is None:
                    log.warning(
                        "stage cache: %s was evicted before this run read it; building it again",
                        cache.path(key),
                    )
                    return False
                snap = self.load_snapshot(entry)
        except (snapshot.SnapshotError, FileNotFoundError) as e:  # a file gone since the manifest check
            cache.discard(key, str(e))
            return False
        for i, r in enumerate(self.state.records):
            r["cached"] = True
            r.setdefault("cached_from", str(cache.path(key)))
            self.ctx.log_record(r, i)  # the tracker's history has the stages the cache served too
        stage = stages[snap.stage_index]
        self.state.stage_index, self.state.stage_name, self._kind = snap.stage_index, stage.name, stage.kind
        log.info(
            "stage cache: reused %s (stages %s)",
            cache.path(key),
            ", ".join(self.order[: snap.stage_index + 1]),
        )
        if self.checkpointing and is_global_zero():  # the run's own resume point
            self.save_snapshot(snapshot.stage_dir(self.checkpoints, snap.stage_index, stage.name), stage.kind)
        return True

    # ---- snapshots (format: dpq.run.snapshot) ---------------------------------------------------
    def save_snapshot(self, directory: Path | str, kind: str | None) -> snapshot.Snapshot:
        """Write the run's state after the current stage into ``directory`` (:func:`snapshot.save_state`)."""
        state = self.state
        same_teacher = self._teacher_snapshot is not None and self._teacher_snapshot[0] is state.teacher
        snap = snapshot.save_state(
            state,
            directory,
            self.order,
            self.ctx.cfg.get("seed"),
            kind,
            teacher_from=self._teacher_snapshot[1] if same_teacher else None,
        )
        if state.teacher is not None:
            self._teacher_snapshot = (state.teacher, snap)
        self.last_snapshot = snap
        return snap

    def load_snapshot(self, directory: Path | str | snapshot.Snapshot) -> snapshot.Snapshot:
        """Restore the state :meth:`save_snapshot` wrote (:class:`~dpq.run.snapshot.SnapshotError` if unusable)."""
        snap = directory if isinstance(directory, snapshot.Snapshot) else snapshot.read(directory)
        self.state = snapshot.load_state(
            snap, self.ctx.load_model, self.ctx.data.num_train, self.ctx.num_labels
        )
        if self.state.teacher is not None:
            self._teacher_snapshot = (self.state.teacher, snap)
        self.last_snapshot, self.next_stage = snap, snap.stage_index + 1
        return snap

    def resume(self, stages: list[Stage]) -> str | None:
        """Continue after the newest intact snapshot of this run, if any; the name of its stage."""
        self._unpublishable = resume.started_elsewhere(self.ctx.output_dir)
        if self._unpublishable and self._unpublishable.startswith("it started under other"):
            log.warning(
                "resuming a run that %s: the stages still to run may not reproduce the uninterrupted run "
                "(results.json records it: resumed_under_other)",
                self._unpublishable.removeprefix("it "),
            )
        snap = snapshot.latest(self.checkpoints, [s.name for s in stages])
        if snap is None:
            return None
        self.load_snapshot(snap)  # run() continues after this snapshot's stage
        return snap.stage

    def _drop_old_checkpoints(self) -> None:
        """Mid-stage checkpoints of finished stages, and snapshots beyond ``checkpoint.keep_snapshots``, go."""
        for d in self.checkpoints.glob("stage_*_*"):
            if (d / snapshot.MANIFEST).exists():
                shutil.rmtree(d / resume.LIGHTNING, ignore_errors=True)
        index = self.state.stage_index
        if self.keep_snapshots > 0 and index is not None:
            for d in self.checkpoints.glob("stage_*_*"):
                idx = int(d.name.split("_")[1]) if d.name.split("_")[1].isdigit() else None
                if idx is not None and idx <= index - self.keep_snapshots:
                    shutil.rmtree(d, ignore_errors=True)

    # ---- the end of a run -------------------------------------------------------------------------
    def fail(self, error: TrainingDiverged | IntegrityError) -> None:
        """Keep what the finished stages measured, marked as such; the newest snapshot is the last good state."""
        status = "diverged" if isinstance(error, TrainingDiverged) else "integrity_failed"
        if is_global_zero():
            write_json_atomic(
                self.ctx.output_dir / "results.json",
                {
                    "status": status,
                    "error": str(error),
                    "stages": self.state.records,
                    "git": self.ctx.git,
                    "config": self.ctx.cfg,
                    "last_good_checkpoint": str(self.last_snapshot.directory) if self.last_snapshot else None,
                },
            )

    def finish(self, started: float, resumed: str | None, resuming: bool) -> dict:
        """Save the final model, reload and re-check it, write results.json; return it.

        Raises :class:`IntegrityError` (after writing results.json with that status) when the saved
        model does not reproduce the run.
        """
        ctx, state, cfg = self.ctx, self.state, self.ctx.cfg
        model, role = state.final_model
        final = dict(state.records[-1]["metrics"])
        writer = is_global_zero()  # DDP: every rank holds the same model; rank 0 writes the run folder
        model_dir = None
        if cfg.get("save_model", True):
            model_dir = ctx.output_dir / "model"
            if writer:
                length = ctx.task.get("max_length") if ctx.tokenizer is not None else None
                write_dir_atomic(model_dir, lambda d: save_model(model, d, ctx.tokenizer, length))
            barrier()  # DDP: the other ranks reload what rank 0 wrote
        integrity_error = None
        if model_dir is not None and cfg.get(
            "integrity", True
        ):  # every rank: under DDP evaluation is collective
            integrity_error = self._check_reload(
                model_dir, role, final, float(cfg.get("integrity_tolerance", 1e-3))
            )
        preds = None
        if writer and integrity_error is None:  # also the reference the ONNX check compares with
            preds, preds_summary = self._write_predictions(model, final)
        onnx_report = None
        if (
            model_dir is not None
            and writer
            and integrity_error is None
            and (cfg.get("export") or {}).get("onnx")
        ):
            onnx_report = self._export_onnx(model, model_dir / "model.onnx", final, preds)
        self._objective(final)  # after the export: a weight may be on an ONNX Runtime figure
        results = records.results(
            cfg,
            state,
            self.order,
            final,
            role,
            ctx.data.splits,
            model_dir,
            time.perf_counter() - started,
            resumed if resuming else None,
            ctx.git,
            ctx.git_earlier_starts,
        )
        if resuming and self._unpublishable:
            results["resumed_under_other"] = self._unpublishable
        if onnx_report is not None:
            results["onnx_export"] = onnx_report
        if preds is not None:
            results["predictions"] = preds_summary
        if integrity_error is not None:
            results.update(status="integrity_failed", error=str(integrity_error))
        if writer:
            write_json_atomic(ctx.output_dir / "results.json", results)
        if integrity_error is not None:
            raise integrity_error
        records.print_table(
            state.records,
            title=f"dpq {cfg['run_name']} -> {ctx.output_dir / 'results.json'}",
            primary=primary_metric(cfg["task"]),
            caption=records.deployed_caption(results["final"]),
        )
        if (
            ctx.tracker is not None
        ):  # W&B: this run's stage table with its Pareto front, the plot, results.json
            from dpq.pareto.wandb_log import log_run

            ctx.tracker.guard(
                "W&B Pareto logging", log_run, ctx.logger, results, ctx.output_dir / "results.json"
            )
        return results

    def _objective(self, final: dict) -> None:
        """``final["objective"]``, the scalarised objective a Bayesian sweep optimises (``objective.weights``,
        sweeps/pareto_bayes.yaml); left out, with an error in the log, when a weighted metric is missing."""
        weights = (self.ctx.cfg.get("objective") or {}).get("weights") or {}
        missing = [k for k in weights if final.get(k) is None]
        if missing:  # (only rank 0 exports: the other DDP ranks leave it out unsaid)
            if not is_global_zero():
                return
            log.error("final.objective not computed: %s", lacking(missing))
        elif weights:
            final["objective"] = float(sum(float(w) * float(final[k]) for k, w in weights.items()))

    def _export_onnx(self, model: nn.Module, path: Path, final: dict, preds: dict | None = None) -> dict:
        """``model/model.onnx``, measured with ONNX Runtime; its figures join ``final`` (``onnx_*``).

        A failed export is reported in results.json (``onnx_export.error``) and the log, not raised:
        the trained run stands, and ``python -m dpq.export <run>`` can export it again.
        """
        from dpq import latency_process
        from dpq.export.evaluate import deploy
        from dpq.export.onnx import OnnxOptions, max_positions, session_threads

        ctx = self.ctx
        opts = {k: v for k, v in (ctx.cfg.get("export") or {}).items() if k != "onnx"}
        opts["max_positions"] = max_positions(opts.get("max_positions"), ctx.task, ctx.cfg["cost"])
        opts["threads"] = session_threads(opts.get("threads", "auto"))
        try:
            metrics, report = deploy(
                model,
                path,
                list(ctx.data.test_dataloader()),
                list(ctx.data.val_dataloader()),
                ctx.example_inputs(),
                ctx.cfg["cost"],
                OnnxOptions(**opts),
                timer=functools.partial(latency_process.onnx_latency, process=ctx.latency_process),
                reference=preds,
            )
        except Exception as e:  # noqa: BLE001 - any failure of the exporter or runtime is reported, not fatal
            log.error(
                "ONNX export failed (%s: %s); the PyTorch model in %s is complete",
                type(e).__name__,
                e,
                path.parent,
            )
            return {"error": f"{type(e).__name__}: {e}"}
        final.update(metrics)
        return report

    def _write_predictions(self, model: nn.Module, final: dict) -> tuple[dict, dict]:
        """``predictions.npz`` beside results.json: the final model's class for every test and
        validation example, for paired per-example comparisons of runs (:mod:`dpq.pareto.paired`).
        Returns the arrays and results.json's ``predictions`` entry."""
        from dpq import predictions

        data = self.ctx.data
        preds = predictions.compute(model, data.test_dataloader(), data.val_dataloader())
        predictions.save(self.ctx.output_dir, preds)
        summary = predictions.summary(preds, final)
        if not summary["matches"]:
            log.warning(
                "predictions.npz does not reproduce the run's accuracies (%s); paired comparisons "
                "will not use it",
                "; ".join(summary["mismatch"]),
            )
        return preds, summary

    def _check_reload(
        self, model_dir: Path, role: str, final: dict, tolerance: float
    ) -> IntegrityError | None:
        """Reload the exported model from disk and re-evaluate it; ``final`` gets ``reload_*`` metrics."""
        reloaded = self.ctx.evaluate(self.ctx.load_model(role, model_dir), "reload")
        final.update(
            reload_accuracy=reloaded["accuracy"],
            reload_val_accuracy=reloaded["val_accuracy"],
            reload_loss=reloaded["loss"],
        )
        try:
            integrity.check_reload(final, reloaded, tolerance)
        except IntegrityError as e:
            return e
        return None
