"""Quantize-aware pruning and recovery (``prune.qat`` / ``recover.qat``, ``pipeline=dpq_qat``).

The ramp and the recovery train the student fake-quantized as the named quantize stage will
quantize it, and end with plain float modules holding the same Parameters.
"""

import lightning as L
import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf, open_dict
from torch import nn

from dpq.quant import QuantConfig, prepare_qat_
from dpq.quant.embedding import FakeQuantizedEmbedding, prepare_embedding_, unprepare_embedding_
from dpq.quant.fake import is_prepared, prepared_modules, unprepare_qat_
from dpq.run.context import RunContext
from dpq.run.stage_cache import prefix_key
from dpq.stages import build_stages
from dpq.train import train


def test_unprepare_gives_plain_modules_with_the_same_parameters_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5)
    )
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    cfg = QuantConfig(bits=2, granularity="per_channel", targets="re:.*", act_bits=8, observer="lsq")
    assert sorted(prepare_qat_(model, cfg)) == ["0", "2"]  # the head stays float
    assert not torch.equal(model(x), ref)  # 2-bit weights and int8 inputs change the output
    assert sorted(unprepare_qat_(model)) == ["0", "2"]
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear and not prepared_modules(model)
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    assert not model[0].training and not model[2].training
    assert torch.equal(model(x), ref)
    assert unprepare_qat_(model) == []  # idempotent


def test_unprepare_embedding_restores_the_table():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    table = model.embeddings.word_embeddings.weight
    prepare_embedding_(model, QuantConfig(bits=4, granularity="per_channel", targets="re:.*"))
    assert isinstance(model.embeddings.word_embeddings, FakeQuantizedEmbedding)
    assert unprepare_embedding_(model) == "embeddings.word_embeddings"
    emb = model.embeddings.word_embeddings
    assert type(emb) is nn.Embedding and emb.weight is table and emb.padding_idx == 0


def test_qat_links_the_later_quantization_stage_and_its_settings_key_the_prune_prefix(tmp_path):
    def cfg(*o):
        return OmegaConf.to_container(compose_cfg(tmp_path, ["experiment=tiny", *o]), resolve=True)

    stages = build_stages(cfg("pipeline=dpq_qat")["pipeline"])
    by = {s.name: s for s in stages}
    assert by["prune"].qat_stage is by["quantize"] and by["recover"].qat_stage is by["quantize"]
    assert by["prune"].qat_settings()["bits"] == 4
    prefix = ["teacher", "distill", "prune"]
    base = prefix_key(cfg("pipeline=dpq_qat"), prefix)
    # The quantize stage's settings shape the prune stage now ...
    assert prefix_key(cfg("pipeline=dpq_qat", "pipeline.stages.quantize.bits=8"), prefix) != base
    assert prefix_key(cfg("pipeline=dpq_qat", "pipeline.stages.quantize.group_size=64"), prefix) != base
    # ... but not its training length, and not at all without qat.
    assert prefix_key(cfg("pipeline=dpq_qat", "pipeline.stages.quantize.epochs=3"), prefix) == base
    plain = prefix_key(cfg("pipeline=dpq"), prefix)
    assert plain != base
    assert prefix_key(cfg("pipeline=dpq", "pipeline.stages.quantize.bits=8"), prefix) == plain
    # The shared teacher -> distill prefix is the same for dpq and dpq_qat.
    assert prefix_key(cfg("pipeline=dpq"), prefix[:2]) == prefix_key(cfg("pipeline=dpq_qat"), prefix[:2])


class _Spy(L.Callback):
    """Records, at every training batch, whether the stage's target modules are fake-quantized."""

    def __init__(self, names):
        self.names, self.seen = names, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        model = pl_module.model
        self.seen.append([is_prepared(model.get_submodule(n)) for n in self.names])


@pytest.fixture
def spy_fits(monkeypatch):
    spies = {}
    real = RunContext.fit

    def fit(self, state, model, stage, *a, callbacks=(), **k):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in f".{n}"]
        spy = spies[stage.name] = _Spy(names)
        params = {n: model.get_submodule(n).weight for n in names}
        out = real(self, state, model, stage, *a, callbacks=[*callbacks, spy], **k)
        spy.after = [type(model.get_submodule(n)) for n in names]
        spy.same_params = all(model.get_submodule(n).weight is p for n, p in params.items())
        spy.weights = {n: p.detach().clone() for n, p in params.items()}
        return out

    monkeypatch.setattr(RunContext, "fit", fit)
    return spies


def test_dpq_qat_prunes_and_recovers_fake_quantized_and_ends_float(make_cfg, spy_fits):
    cfg = make_cfg(
        "experiment=tiny",
        "pipeline=dpq_qat",
        "pipeline.stages.quantize.bits=2",
        "trainer.limit_train_batches=6",
    )
    results = train(cfg)
    recs = {r["stage"]: r for r in results["stages"]}
    for stage in ("prune", "recover"):
        spy = spy_fits[stage]
        assert spy.seen and all(all(b) for b in spy.seen), stage  # every batch, every encoder linear
        assert all(t is nn.Linear for t in spy.after) and spy.same_params, stage  # float again, same weights
        assert recs[stage]["qat"]["stage"] == "quantize" and recs[stage]["qat"]["bits"] == 2
    assert not any(any(b) for b in spy_fits["distill"].seen)  # the other stages train in float
    assert recs["prune"]["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert recs["quantize"]["bits"] == 2 and recs["quantize"]["sparsity_kept"]


def test_qat_during_prune_changes_what_the_ramp_learns(make_cfg, spy_fits, tmp_path):
    """Same seed, data and distilled student (one stage cache serves both): with 2-bit fake
    quantization in the forward, the ramp ends at other weights than the float ramp."""
    pruned = {}
    for qat in ("null", "quantize"):
        cfg = make_cfg(
            "experiment=tiny",
            "pipeline=dpq",
            "pipeline.order=[teacher,distill,prune,quantize]",
            "pipeline.stages.quantize.bits=2",
            f"pipeline.stages.prune.qat={qat}",
            "trainer.limit_train_batches=6",
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"run-{qat}")
        train(cfg)
        pruned[qat] = spy_fits["prune"].weights
    a, b = pruned["null"], pruned["quantize"]
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4
    for w in b.values():  # the QAT ramp's zeros are exact zeros, at the target sparsity
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
