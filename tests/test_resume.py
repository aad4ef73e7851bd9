"""A killed run resumes where it stopped and ends exactly as the uninterrupted run (CPU, deterministic).

Fast tests: the pieces (sampler, atomic writes, checkpoint choice, snapshots, the run folder)
and one in-process crash mid-prune resumed with its newest checkpoint *and* its newest stage
snapshot corrupted. Slow: real ``SIGKILL``s of ``python -m dpq.train`` during prune and during
quantize, each resumed with ``python -m dpq.train resume=<run folder>``.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import compose_cfg
from safetensors.torch import load_file
from torch.utils.data import RandomSampler

from dpq.core.errors import ConfigError
from dpq.run import resume, snapshot
from dpq.run.context import RunContext
from dpq.train import train

# digits, a few batches per epoch, a mid-stage checkpoint every 3 steps. The prune ramp updates its
# masks every 2 steps (experiment=digits), so checkpoints fall on update steps and between them.
FAST = [
    "experiment=digits",
    "trainer.deterministic=true",
    "checkpoint.every_n_steps=3",
    "cost.repeats=1",
    "cost.warmup=0",
    "+trainer.limit_train_batches=6",
    "pipeline.stages.teacher.epochs=2",
    "pipeline.stages.distill.epochs=2",
    "pipeline.stages.prune.epochs=3",
    "pipeline.stages.recover.epochs=1",
    "pipeline.stages.quantize.epochs=2",
    "model.dropout=0.1",  # dropout draws from the RNG streams a resume must restore
]
# Numbers that are a function of the weights (latency, peak memory and durations are measurements).
DETERMINISTIC = [
    "accuracy",
    "loss",
    "val_accuracy",
    "val_loss",
    "sparsity",
    "params_nonzero",
    "params_total",
    "effective_gflops",
    "dense_gflops",
    "size_bytes",
]


# ---- pieces -------------------------------------------------------------------------------------
def test_resumable_sampler_order_is_a_function_of_seed_and_epoch_and_skips_what_was_seen():
    data = list(range(50))
    a, b = resume.ResumableSampler(RandomSampler(data), 7), resume.ResumableSampler(RandomSampler(data), 7)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(123)  # the global RNG does not matter
    assert list(b) == first and sorted(first) == data
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(second) == data
    b.resume_at(1, 20)  # resumed in epoch 1 after 20 examples: the rest of that same epoch
    assert list(b) == second[20:]
    assert list(b) == second  # the skip applies to one pass only
    assert list(resume.ResumableSampler(RandomSampler(data), 8)) != first


def test_atomic_checkpoint_write_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    io = resume.AtomicCheckpointIO()
    path = tmp_path / "step0000003.ckpt"
    io.save_checkpoint({"x": torch.ones(3)}, path)
    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("killed while writing")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        io.save_checkpoint({"x": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path)["x"], torch.ones(3))  # the previous checkpoint, intact
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary debris


def test_atomic_files_get_the_umask_mode_folders_are_synced_whole_and_a_failed_swap_keeps_the_old(
    tmp_path, monkeypatch
):
    from dpq import predictions
    from dpq.core import files

    old_mask = os.umask(0o022)
    try:
        files.write_json_atomic(tmp_path / "results.json", {"a": 1})
        predictions.save(tmp_path, {"test_pred": np.zeros(3, dtype=np.int64)})
    finally:
        os.umask(old_mask)
    for name in ("results.json", "predictions.npz"):  # mkstemp's 0600 kept a shared folder's files private
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert predictions.load(tmp_path)["test_pred"].tolist() == [0, 0, 0]

    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", record)
    target = tmp_path / "entry"

    def fill(d):
        (d / "sub").mkdir()
        (d / "sub" / "weights.bin").write_bytes(b"w" * 10)
        (d / "COMPLETE").write_text("")

    assert files.write_dir_atomic(target, fill)
    names = {Path(p).name for p in synced}
    assert {"weights.bin", "COMPLETE", "sub"} <= names  # each file synced before the folder is renamed in

    real_rename = os.rename

    def fails_into_place(src, dst):
        if Path(dst) == target and ".tmp-" in Path(src).name:  # the new folder cannot go in
            raise OSError("no space left")
        real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", fails_into_place)
    with pytest.raises(OSError, match="no space"):
        files.write_dir_atomic(target, lambda d: (d / "COMPLETE").write_text("new"))
    assert (target / "sub" / "weights.bin").read_bytes() == b"w" * 10  # the old complete folder, back
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".entry")) == []


def test_newest_readable_checkpoint_wins_and_a_truncated_one_is_set_aside(tmp_path, caplog):
    for step in (3, 6, 9):
        torch.save(
            {"state_dict": {"w": torch.full((4,), float(step))}, "loops": {}},
            tmp_path / f"step{step:07d}.ckpt",
        )
    newest = tmp_path / "step0000009.ckpt"
    newest.write_bytes(newest.read_bytes()[:40])  # truncated
    assert resume.newest_checkpoint(tmp_path) == tmp_path / "step0000006.ckpt"
    assert (tmp_path / "step0000009.ckpt.corrupt").exists() and not newest.exists()
    assert "unreadable" in caplog.text
    assert resume.newest_checkpoint(tmp_path / "missing") is None


def _tiny_snapshot(tmp_path):
    from dpq.distill.teachers import TeacherLogits, cache_state
    from dpq.models import MLPClassifier

    torch.manual_seed(0)
    student, teacher = MLPClassifier(8, 3, [6]), MLPClassifier(8, 3, [16])
    masks = {"hidden.0": torch.rand(6, 8) > 0.5}
    cache = TeacherLogits(teacher, 10, 3)
    cache(dict(features=torch.randn(4, 8)), torch.tensor([1, 3, 5, 7]))
    manifest = {
        "stage_index": 2,
        "stage": "prune",
        "kind": "prune",
        "order": ["teacher", "distill", "prune"],
        "quantized": False,
        "records": [{"stage": "teacher"}],
        "fit_steps": {"prune": 18},
    }
    snap = snapshot.write(
        tmp_path / "stage_2_prune",
        manifest,
        student=student,
        teacher=teacher,
        masks=masks,
        teacher_logits=cache_state([cache]),
    )
    return snap, student, masks, cache


def test_snapshot_round_trip_and_every_kind_of_damage_is_detected(tmp_path):
    from dpq.checkpoints import load_model

    snap, student, masks, cache = _tiny_snapshot(tmp_path)
    back = snapshot.read(snap.directory)
    assert back.manifest["fit_steps"] == {"prune": 18} and back.stage_index == 2
    assert torch.equal(snapshot.load_masks(back)["hidden.0"], masks["hidden.0"])
    reloaded = load_model({"arch": "mlp"}, {}, back.path(snapshot.STUDENT))
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), student.state_dict().values())
    )
    state = snapshot.load_teacher_logits(back)
    assert torch.equal(state["0.filled"], cache.filled) and torch.equal(state["0.logits"], cache.logits)
    assert snapshot.latest(tmp_path, ["teacher", "distill", "prune"]).directory == snap.directory
    assert snapshot.latest(tmp_path, ["teacher", "prune"]) is None  # another pipeline's snapshot is not used

    weights = snap.directory / "student" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(raw))
    with pytest.raises(snapshot.SnapshotError, match="SHA-256"):
        snapshot.read(snap.directory)
    weights.write_bytes(bytes(raw[:-10]))  # truncated
    with pytest.raises(snapshot.SnapshotError, match="truncated"):
        snapshot.read(snap.directory)
    mf = snap.directory / snapshot.MANIFEST
    mf.write_text(json.dumps({**json.loads(mf.read_text()), "format": 0}))
    with pytest.raises(snapshot.SnapshotError, match="format 0"):
        snapshot.read(snap.directory)
    mf.unlink()
    with pytest.raises(snapshot.SnapshotError, match="incomplete"):
        snapshot.read(snap.directory)


def test_a_teacher_linked_from_an_entry_evicted_meanwhile_is_saved_whole(tmp_path, monkeypatch):
    from dpq.checkpoints import load_model

    snap, _, _, _ = _tiny_snapshot(tmp_path)
    teacher = load_model({"arch": "mlp"}, {}, snap.path(snapshot.TEACHER))
    manifest = {k: snap.manifest[k] for k in ("stage_index", "stage", "kind", "order", "records")}
    linked = snapshot.write(tmp_path / "linked", manifest, teacher=teacher, teacher_from=snap)
    assert (linked.path(snapshot.TEACHER) / "model.safetensors").stat().st_ino == (
        snap.path(snapshot.TEACHER) / "model.safetensors"
    ).stat().st_ino  # linked, not saved again

    # `python -m dpq.stage_cache prune` removes the source after the existence check, before the links
    real_link_tree = snapshot.link_tree

    def evicted_first(src, dst):
        shutil.rmtree(src)
        real_link_tree(src, dst)

    monkeypatch.setattr(snapshot, "link_tree", evicted_first)
    again = snapshot.read(tmp_path / "linked")
    saved = snapshot.write(tmp_path / "after", manifest, teacher=teacher, teacher_from=again)
    back = snapshot.read(saved.directory)
    assert any(k.startswith("teacher/") for k in back.manifest["files"])
    reloaded = load_model({"arch": "mlp"}, {}, back.path(snapshot.TEACHER))
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), teacher.state_dict().values())
    )

    # an entry written before this check, its teacher/ empty, is refused as a snapshot (and discarded)
    mf = saved.directory / snapshot.MANIFEST
    data = json.loads(mf.read_text())
    data["files"] = {k: v for k, v in data["files"].items() if not k.startswith("teacher/")}
    mf.write_text(json.dumps(data))
    with pytest.raises(snapshot.SnapshotError, match="teacher holds no file"):
        snapshot.read(saved.directory)


def test_a_new_run_never_writes_into_another_runs_folder(tmp_path):
    resume.claim_output_dir(tmp_path / "run", {"seed": 1})
    record = json.loads((tmp_path / "run" / "checkpoints" / "run.json").read_text())
    assert record["config"] == {"seed": 1} and set(record) == {"config", "code"}
    with pytest.raises(ConfigError, match="already holds another run"):
        resume.claim_output_dir(tmp_path / "run", {"seed": 2})


def test_a_resume_folder_that_does_not_exist_is_refused_from_the_command_line(tmp_path):
    (tmp_path / "run").mkdir()
    for ok in (["resume=" + str(tmp_path / "run")], ["seed=1"], ["resume=null"], ["resume="]):
        resume.check_resume_argument(ok)
    for bad in (f"resume={tmp_path}/rnu", f"+resume='{tmp_path}/rnu'"):
        with pytest.raises(ConfigError, match="no such folder") as err:
            resume.check_resume_argument(["seed=1", bad])
        assert err.value.key == "resume" and err.value.value == str(tmp_path / "rnu")
    (tmp_path / "run" / "results.json").write_text("{}")  # the run's file, not its folder: a Hydra traceback
    with pytest.raises(ConfigError, match="is a file, not a run folder"):
        resume.check_resume_argument(["resume=" + str(tmp_path / "run" / "results.json")])


def test_resuming_a_multirun_folder_or_a_finished_run_without_checkpoints_says_what_it_is(tmp_path):
    """Both held no checkpoints/run.json and got only "only a run started with checkpoint.enabled=true can be
    resumed": the multirun's runs are one level down; a finished run (checkpoints removed) has nothing left."""
    for job in ("0", "1"):
        (tmp_path / "multi" / job / "checkpoints").mkdir(parents=True)
        (tmp_path / "multi" / job / "checkpoints" / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds 2 run folder\(s\) that can be, e.g. .*multi/0: pass one"):
        resume.load_run_config(tmp_path / "multi")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text('{"status": "completed"}')
    with pytest.raises(ConfigError, match="the run finished, nothing is left to resume"):
        resume.load_run_config(tmp_path / "done")
    (tmp_path / "other").mkdir()
    with pytest.raises(ConfigError, match=r"checkpoint.enabled=true can be resumed$"):
        resume.load_run_config(tmp_path / "other")


def test_resume_refuses_overrides_that_would_change_the_run():
    resume.check_resume_overrides("out/run", ["resume=out/run", "hydra.verbose=true"])
    resume.check_resume_overrides("out/run", ["resume=out/run", "hydra/launcher=submitit_slurm"])
    with pytest.raises(ConfigError) as err:
        resume.check_resume_overrides(
            "out/run", ["resume=out/run", "pipeline.stages.prune.final_sparsity=0.9"]
        )
    assert err.value.key == "resume" and "pipeline.stages.prune.final_sparsity=0.9" in str(err.value)


# ---- the whole run --------------------------------------------------------------------------------
class Crash(L.Callback):
    """Stands in for a kill: the process dies right after an optimizer step (not on a checkpoint step)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated kill at step {self.step}")


def crash_in(monkeypatch, stage_name: str, step: int) -> None:
    real = RunContext.fit

    def fit(self, state, model, stage, *a, callbacks=(), **k):
        if stage.name == stage_name:
            callbacks = [*callbacks, Crash(step)]
        return real(self, state, model, stage, *a, callbacks=callbacks, **k)

    monkeypatch.setattr(RunContext, "fit", fit)


def final_snapshot(run_dir: Path) -> snapshot.Snapshot:
    return snapshot.latest(
        run_dir / "checkpoints", json.loads((run_dir / "results.json").read_text())["order"]
    )


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    """Same per-stage numbers, masks, ramp position, step counts and final weights (bit for bit)."""
    a, b = (json.loads((d / "results.json").read_text()) for d in (a_dir, b_dir))
    assert [s["stage"] for s in a["stages"]] == [s["stage"] for s in b["stages"]]
    for ra, rb in zip(a["stages"], b["stages"]):
        assert ra.get("mask_updates") == rb.get("mask_updates"), (
            f"{ra['stage']}: the sparsity ramp made {rb.get('mask_updates')} mask updates after resuming, "
            f"{ra.get('mask_updates')} uninterrupted -- SparsityRamp.on_train_start must not update masks it restored"
        )
        for k in ("ramp", "fake_quant_accuracy"):
            assert ra.get(k) == rb.get(k), (ra["stage"], k)
        for k in DETERMINISTIC:
            assert ra["metrics"][k] == rb["metrics"][k], (ra["stage"], k)
    assert b["status"] == "completed" and b["final"]["reload_accuracy"] == b["final"]["accuracy"]
    sa, sb = final_snapshot(a_dir), final_snapshot(b_dir)
    assert sa.manifest["fit_steps"] == sb.manifest["fit_steps"] and sa.stage == sb.stage
    ma, mb = snapshot.load_masks(sa), snapshot.load_masks(sb)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    for f in sorted(p.name for p in (a_dir / "model").glob("*.safetensors")):
        wa, wb = load_file(str(a_dir / "model" / f)), load_file(str(b_dir / "model" / f))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f


@pytest.fixture(scope="module")
def reference_dp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    train(compose_cfg(tmp, [*FAST, "pipeline=dp"]))
    return tmp / "run"


def test_killed_mid_prune_with_damaged_newest_checkpoint_and_snapshot_resumes_to_the_same_result(
    tmp_path, monkeypatch, reference_dp, caplog
):
    crash_in(monkeypatch, "prune", 13)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(compose_cfg(tmp_path, [*FAST, "pipeline=dp"]))
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints" / "stage_2_prune" / "lightning" / "prune"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["step0000009.ckpt", "step0000012.ckpt"]
    assert not (run_dir / "checkpoints" / "stage_2_prune" / snapshot.MANIFEST).exists()
    # Damage the newest of everything: the step-12 checkpoint is cut short, the distill snapshot's student edited.
    newest = ckpts / "step0000012.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    student = run_dir / "checkpoints" / "stage_1_distill" / "student" / "model.safetensors"
    raw = bytearray(student.read_bytes())
    raw[-1] ^= 0x01
    student.write_bytes(bytes(raw))

    results = train(compose_cfg(tmp_path / "elsewhere", ["resume=" + str(run_dir)]))
    assert "does not match its SHA-256" in caplog.text and "step0000012.ckpt is unreadable" in caplog.text
    # distill re-runs from the teacher snapshot; prune resumes at step 9, between two mask updates (every 2 steps)
    assert results["resumed_after"] == "teacher"
    assert (
        ckpts.parent.parent / snapshot.MANIFEST
    ).exists() and not ckpts.exists()  # mid-stage checkpoints cleaned up
    assert_same_run(reference_dp, run_dir)
    # Resuming a finished run changes nothing.
    again = train(compose_cfg(tmp_path / "elsewhere2", ["resume=" + str(run_dir)]))
    assert again["wall_time_s"] == results["wall_time_s"]


def test_killed_mid_quantize_aware_prune_resumes_to_the_same_result(tmp_path, monkeypatch):
    """prune.qat with learned quantizers (LSQ steps, int8 activation ranges): they live in the module
    checkpoint while the ramp runs, so a resumed ramp continues with them, and ends float as uninterrupted."""
    args = [
        *FAST,
        "pipeline=dpq_qat",
        "pipeline.stages.quantize.observer=lsq",
        "pipeline.stages.quantize.act_bits=8",
    ]
    train(compose_cfg(tmp_path / "ref", args))
    crash_in(monkeypatch, "prune", 13)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(compose_cfg(tmp_path / "killed", args))
    monkeypatch.undo()
    run_dir = tmp_path / "killed" / "run"
    ckpt = torch.load(
        sorted((run_dir / "checkpoints" / "stage_2_prune" / "lightning" / "prune").glob("*.ckpt"))[-1],
        weights_only=False,
    )
    assert any(
        k.endswith("weight_fake_quantizer.step") for k in ckpt["state_dict"]
    )  # fake-quantized mid-ramp
    results = train(compose_cfg(tmp_path / "elsewhere", ["resume=" + str(run_dir)]))
    assert results["resumed_after"] == "distill"
    assert_same_run(tmp_path / "ref" / "run", run_dir)


def test_killed_mid_obs_prune_resumes_to_the_same_result(tmp_path, monkeypatch):
    """criterion=obs gathers raw gradients for its next mask update (num_grads copies of the weights),
    which no checkpoint holds: a step between two updates is not checkpointed (steps 3 and 9 here, with
    updates every 2 steps), so the resumed ramp rebuilds the update from all its gradients. (Resuming from
    step 9 gave other masks and another accuracy.)"""
    args = [*FAST, "pipeline=dp", "pipeline.stages.prune.criterion=obs"]
    train(compose_cfg(tmp_path / "ref", args))
    crash_in(monkeypatch, "prune", 11)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(compose_cfg(tmp_path / "killed", args))
    monkeypatch.undo()
    run_dir = tmp_path / "killed" / "run"
    ckpts = run_dir / "checkpoints" / "stage_2_prune" / "lightning" / "prune"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["step0000006.ckpt"]
    results = train(compose_cfg(tmp_path / "elsewhere", ["resume=" + str(run_dir)]))
    assert results["resumed_after"] == "distill"
    assert_same_run(tmp_path / "ref" / "run", run_dir)


def test_a_resume_on_changed_data_is_refused_before_any_training(tmp_path, monkeypatch):
    """Between the kill and the resume one training label changed (a file edited in place, a hub dataset's
    new revision; here the embedded loader's table): same source, same sizes, so only the content digest
    that run.json recorded tells. The resume stops with a config error and trains nothing."""
    from dpq.data import sources

    args = [*FAST, "pipeline=dp"]
    crash_in(monkeypatch, "distill", 2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(compose_cfg(tmp_path, args))
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    recorded = json.loads((run_dir / "checkpoints" / "run.json").read_text())["data"]
    assert recorded["source"] == "embedded:sklearn_digits" and len(recorded["content"]) == 20

    real = sources.EMBEDDED_LOADERS["sklearn_digits"]

    def edited(**kw):
        ds = real(**kw)
        return ds.map(lambda row, i: {"label": (row["label"] + 1) % 10} if i == 0 else {}, with_indices=True)

    monkeypatch.setitem(sources.EMBEDDED_LOADERS, "sklearn_digits", edited)
    fits = []
    monkeypatch.setattr(RunContext, "fit", lambda *a, **k: fits.append(a))
    with pytest.raises(ConfigError) as err:
        train(compose_cfg(tmp_path / "elsewhere", ["resume=" + str(run_dir)]))
    msg = str(err.value)
    assert err.value.key == "resume" and f"content {recorded['content']} then" in msg, msg
    assert "source" not in msg and "sizes" not in msg  # only the content differs
    assert fits == []
    monkeypatch.setitem(sources.EMBEDDED_LOADERS, "sklearn_digits", real)  # the data as it was: resumes
    monkeypatch.undo()
    assert train(compose_cfg(tmp_path / "again", ["resume=" + str(run_dir)]))["status"] == "completed"


# ---- real kills ----------------------------------------------------------------------------------------
def _cli(run_dir: Path, args: list[str], cache: Path) -> subprocess.Popen:
    env = {**os.environ, "DPQ_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [sys.executable, "-m", "dpq.train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=run_dir.parent,
    )


def _kill_when(proc: subprocess.Popen, folder: Path, timeout: float = 400) -> None:
    """SIGKILL ``proc`` as soon as a mid-stage checkpoint appears in ``folder``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}")
        if any(folder.glob("*.ckpt")):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no checkpoint appeared in {folder}")


@pytest.mark.slow
def test_sigkill_during_prune_and_during_quantize_then_resume_gives_the_uninterrupted_result(tmp_path):
    args = [*FAST, "pipeline=dpq", "logger=none"]
    ref = compose_cfg(tmp_path / "ref", args)
    train(ref)
    run_dir, cache = tmp_path / "killed" / "run", tmp_path / "cache"
    run_dir.parent.mkdir()
    ck = run_dir / "checkpoints"

    proc = _cli(run_dir, [*args, f"hydra.run.dir={run_dir}"], cache)
    _kill_when(proc, ck / "stage_2_prune" / "lightning" / "prune")
    assert proc.returncode == -signal.SIGKILL
    assert not (ck / "stage_2_prune" / snapshot.MANIFEST).exists()  # killed inside the stage

    proc = _cli(run_dir, [f"resume={run_dir}"], cache)
    _kill_when(proc, ck / "stage_4_quantize" / "lightning" / "quantize")
    assert (ck / "stage_3_recover" / snapshot.MANIFEST).exists() and not (run_dir / "results.json").exists()

    proc = _cli(run_dir, [f"resume={run_dir}"], cache)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").exists() and len(
        list((run_dir / ".hydra").glob("resume-*"))
    ) >= 1
    assert json.loads((run_dir / "results.json").read_text())["resumed_after"] == "recover"
    assert_same_run(tmp_path / "ref" / "run", run_dir)


@pytest.mark.parametrize("elsewhere", [False, True])
def test_a_run_resumed_under_other_threads_publishes_nothing_to_the_stage_cache(
    tmp_path, monkeypatch, caplog, elsewhere
):
    """Killed in its first stage (no snapshot yet), a resumed run takes the cached path and publishes its
    stages. Started under other code, libraries, hardware or threads (run.json's ``code``), its first stage
    would be a mix of both processes keyed as this one's: then it publishes nothing."""
    from dpq.run.stage_cache import StageCache

    crash_in(monkeypatch, "teacher", 5)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(compose_cfg(tmp_path, [*FAST, "pipeline=dense"]))
    monkeypatch.undo()
    run_json = tmp_path / "run" / "checkpoints" / "run.json"
    record = json.loads(run_json.read_text())
    assert record["code"]["compute"]["torch_threads"] == str(torch.get_num_threads())
    if elsewhere:
        record["code"]["compute"]["torch_threads"] = "99"
        run_json.write_text(json.dumps(record))
    with caplog.at_level("INFO"):
        results = train(compose_cfg(tmp_path, ["resume=" + str(tmp_path / "run")]))
    assert results["status"] == "completed"
    published = StageCache(tmp_path / "cache" / "stages").entries()
    said = "stage cache: not used by this resumed run: it started under other compute than this process has"
    assert (said in caplog.text) == elsewhere
    assert len(published) == (0 if elsewhere else 2)
    # said as a warning (the rest may not reproduce the uninterrupted run) and kept in results.json
    warned = "resuming a run that started under other compute than this process has" in caplog.text
    assert warned == elsewhere
    assert results.get("resumed_under_other") == (said.split(": ", 2)[2] if elsewhere else None)


def test_a_quoted_tilde_in_resume_names_the_home_folder_not_a_folder_called_tilde(monkeypatch, tmp_path):
    """resume='~/run' (Hydra's grammar needs the quotes): the run was found, but its log and Hydra's record
    went to ./~/run/, because the run-folder resolver did not expand ~ as the checks do."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("HOME", str(tmp_path))
    resume.register_resolvers()
    cfg = OmegaConf.create({"resume": "~/run", "dir": "${dpq_run_dir:${resume},outputs/new}"})
    assert cfg.dir == str(tmp_path / "run")
    assert (
        OmegaConf.create({"resume": None, "dir": "${dpq_run_dir:${resume},outputs/new}"}).dir == "outputs/new"
    )


def test_a_multirun_jobs_folder_name_is_cut_to_what_a_filesystem_holds():
    """subdir was <num>_<override_dirname>: seven ordinary stage overrides made it over 255 bytes, and Hydra
    failed to create job 0's folder ("File name too long") after every job had passed its checks."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from dpq.core.config import CONF_DIR

    long = ",".join(f"pipeline.stages.prune.setting_{i}=0.{i}" for i in range(12))
    cut = resume.short_dirname(long)
    assert len(cut.encode()) <= resume.DIRNAME_BYTES < 255 and cut.startswith(long[:150])
    assert cut != resume.short_dirname(long[:-1] + "9")  # the digest keeps different jobs apart
    assert resume.short_dirname("seed=1,pipeline=dq") == "seed=1,pipeline=dq"  # short names as they were
    resume.register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["seed=1"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num, cfg.hydra.job.override_dirname = 3, long
    assert cfg.hydra.sweep.subdir == f"3_{cut}"
