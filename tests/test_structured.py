"""Structured pruning on a BERT encoder: exact group counts, masked == shrunk, FLOPs that drop
by the hand-computed amount, reload of the shrunk model, and mid-stage resume."""

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpq import cost
from dpq.checkpoints import load_model, save_model
from dpq.prune import structured
from dpq.prune.callbacks import SparsityRamp
from dpq.prune.masks import apply_masks

HIDDEN, HEADS, FFN, LAYERS, SEQ, VOCAB = 64, 4, 128, 2, 16, 100
TARGETS_RE = (
    r".*encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


def tiny_bert(seed=0, dropout=0.1):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
        num_labels=3,
        attn_implementation="eager",
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(cfg).eval()


def targets(model):
    import re

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(TARGETS_RE, n)]


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -5:] = 0  # padding must behave the same in both models
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def prune_and_shrink(model, granularity, sparsity, scope="layer"):
    sets = structured.find_groups(model, granularity, targets(model))
    scores = {n: model.get_submodule(n).weight.abs() for s in sets for n in s.modules}
    keep = structured.select_groups(sets, scores, sparsity, scope=scope)
    masks = structured.group_masks(model, sets, keep)
    apply_masks(model, masks)
    masked = copy.deepcopy(model)
    structured.shrink_(model, sets, keep)
    return sets, keep, masked


def test_discovers_heads_and_neurons_of_every_layer():
    model = tiny_bert()
    heads = structured.find_groups(model, "heads")
    neurons = structured.find_groups(model, "neurons")
    assert [g.count for g in heads] == [HEADS] * LAYERS
    assert [g.count for g in neurons] == [FFN] * LAYERS
    assert heads[0].producers[0].size == HIDDEN // HEADS
    assert heads[0].consumers[0].module == "bert.encoder.layer.0.attention.output.dense"
    assert len(structured.find_groups(model, "heads+neurons")) == 2 * LAYERS
    # targets restrict the sets: only layer 1
    only = structured.find_groups(model, "heads", [t for t in targets(model) if ".layer.1." in t])
    assert [g.name for g in only] == ["bert.encoder.layer.1.attention"]


@pytest.mark.parametrize(
    "granularity,sparsity", [("heads", 0.5), ("neurons", 0.5), ("heads+neurons", 0.25), ("neurons", 0.3)]
)
def test_exact_group_sparsity_and_masked_equals_shrunk(granularity, sparsity):
    model = tiny_bert()
    x = inputs()
    before_params = cost.parameter_counts(model)["params_total"]
    sets, keep, masked = prune_and_shrink(model, granularity, sparsity)
    for g in sets:  # round(sparsity * count) groups removed in every layer, no more, no less
        assert int((~keep[g.name]).sum()) == round(sparsity * g.count)
    assert torch.allclose(logits(masked, x), logits(model, x), atol=1e-5, rtol=0)
    assert cost.parameter_counts(model)["params_total"] < before_params


def test_shrunk_fvcore_gflops_drop_by_the_hand_computed_amount():
    model = tiny_bert()
    x = {"input_ids": inputs(batch=1)["input_ids"]}  # no mask: fvcore traces a plain forward
    dense = cost.flops(model, x)["dense_gflops"]
    sets, keep, _ = prune_and_shrink(model, "heads+neurons", 0.5)
    after = cost.flops(model, x)["dense_gflops"]
    d = HIDDEN // HEADS
    heads_gone = sum(int((~keep[g.name]).sum()) for g in sets if g.kind == "heads")
    neurons_gone = sum(int((~keep[g.name]).sum()) for g in sets if g.kind == "neurons")
    # per token: Q, K, V rows (3*H*d) and O columns (d*H) of each head, plus QK^T and AV (2*SEQ*d);
    # per token per neuron: one row of the up- and one column of the down-projection (2*H).
    expected = SEQ * (heads_gone * (4 * HIDDEN * d + 2 * SEQ * d) + neurons_gone * 2 * HIDDEN)
    assert (dense - after) * 1e9 == pytest.approx(expected, rel=1e-6)


def test_global_scope_removes_the_fraction_of_all_groups_and_keeps_min_per_layer():
    model = tiny_bert()
    with torch.no_grad():  # make layer 0's FFN much weaker so a global threshold empties it first
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(1e-3)
        model.bert.encoder.layer[0].output.dense.weight.mul_(1e-3)
    sets = structured.find_groups(model, "neurons")
    scores = {n: model.get_submodule(n).weight.abs() for s in sets for n in s.modules}
    keep = structured.select_groups(sets, scores, 0.6, scope="global", min_keep=4)
    gone = {g.name: int((~keep[g.name]).sum()) for g in sets}
    assert sum(gone.values()) == round(0.6 * 2 * FFN)
    assert gone["bert.encoder.layer.0.intermediate"] == FFN - 4  # emptied down to min_keep


def test_shrunk_model_saves_and_reloads_with_the_same_logits(tmp_path):
    model = tiny_bert()
    x = inputs()
    prune_and_shrink(model, "heads+neurons", 0.5)
    save_model(model, tmp_path / "m")
    again = load_model({}, {}, tmp_path / "m")
    assert torch.allclose(logits(model, x), logits(again, x), atol=1e-6, rtol=0)
    att = again.bert.encoder.layer[0].attention.self
    assert att.num_attention_heads == HEADS // 2 and att.query.out_features == HIDDEN // 2
    assert again.dpq_original_groups["bert.encoder.layer.0.attention"] == HEADS


def test_a_shrunk_folder_as_pretrained_or_a_shrunk_teacher_to_copy_layers_from_is_a_config_error(tmp_path):
    """Both rebuilt the full shapes and failed with a size mismatch (after the teacher had trained); a
    shrunk folder loads as a teacher through the teacher stage's load_from (dpq's own loader)."""
    from dpq.core.errors import ConfigError
    from dpq.models.hf import hf_config, student_from_teacher

    model = tiny_bert()
    prune_and_shrink(model, "heads", 0.5)
    save_model(model, tmp_path / "m")
    spec = {"arch": "hf", "init": "pretrained", "pretrained": str(tmp_path / "m"), "fine_tuned": True}
    task = {"name": "t", "num_labels": model.config.num_labels}
    with pytest.raises(ConfigError, match="structurally shrunk dpq model .*teacher.load_from") as e:
        hf_config(spec, task, "teacher")
    assert e.value.key == "teacher.pretrained"
    with pytest.raises(ConfigError, match="this teacher is structurally shrunk"):
        student_from_teacher(load_model({}, {}, tmp_path / "m"), [0])


def test_a_shrunk_native_model_reloads_in_eval_mode_with_its_original_group_counts(tmp_path):
    """dpq's own MLP came back in train mode (dropout on) and without dpq_original_groups, so a later prune
    stage after a resume or a stage-cache restore counted its sparsity against the shrunk width."""
    from dpq.models import MLPClassifier

    torch.manual_seed(0)
    model = MLPClassifier(12, 3, [16, 16], dropout=0.5)
    sets = structured.find_groups(model, "neurons")
    scores = {n: model.get_submodule(n).weight.abs() for s in sets for n in s.modules}
    keep = structured.select_groups(sets, scores, 0.5)
    apply_masks(model, structured.group_masks(model, sets, keep))
    structured.shrink_(model, sets, keep)
    save_model(model.eval(), tmp_path / "m")
    again = load_model({}, {}, tmp_path / "m")
    assert not again.training
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert again.dpq_original_groups == model.dpq_original_groups and set(
        model.dpq_original_groups.values()
    ) == {16}


def test_a_second_stage_counts_sparsity_against_the_original_groups():
    model = tiny_bert()
    sets, keep, _ = prune_and_shrink(model, "neurons", 0.25)
    sets2 = structured.find_groups(model, "neurons")
    assert [g.count for g in sets2] == [FFN - FFN // 4] * LAYERS
    scores = {n: model.get_submodule(n).weight.abs() for s in sets2 for n in s.modules}
    keep2 = structured.select_groups(sets2, scores, 0.5, totals=model.dpq_original_groups)
    assert [int(k.sum()) for k in keep2.values()] == [FFN // 2] * LAYERS  # 50% of the original 128 left


# ---- the ramp inside Lightning: exact counts at stage end, per-update logs, mid-stage resume ----


class Classifier(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, i):
        ids, y = batch
        return nn.functional.cross_entropy(self.model(input_ids=ids).logits, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(
            torch.randint(0, VOCAB, (64, SEQ), generator=g), torch.randint(0, 3, (64,), generator=g)
        ),
        batch_size=8,
    )


class Recorder(L.pytorch.loggers.Logger):
    name, version = "rec", 0

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *a, **k):
        pass


def ramp_for(model, criterion="taylor"):
    sets = structured.find_groups(model, "heads+neurons", targets(model))
    return SparsityRamp(
        "prune", targets(model), 0.0, 0.5, update_every=2, ramp_end=0.75, criterion=criterion, groups=sets
    )


def run(model, ramp, epochs, ckpt_dir=None, resume=None, logger=None):
    L.seed_everything(0, verbose=False)
    cbs = [ramp]
    if ckpt_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, filename="{epoch}"))
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=cbs,
        logger=logger or False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(Classifier(model), data(), ckpt_path=resume)
    return trainer


def test_ramp_ends_with_exact_heads_and_neurons_and_logs_every_update():
    model = tiny_bert().train()
    ramp, rec = ramp_for(model), Recorder()
    run(model, ramp, epochs=2, logger=rec)
    for g in ramp.groups:
        assert int(ramp.group_keep[g.name].sum()) == g.count // 2
        for s in g.slices:  # removed groups are exactly zero in every producer and consumer slice
            w = model.get_submodule(s.module).weight
            assert int((w == 0).sum()) >= (g.count // 2) * s.size * (w.numel() // w.shape[s.dim])
    updates = [m for _, m in rec.rows if "prune/target_sparsity" in m]
    assert len(updates) == len(ramp.history) >= 4
    last = updates[-1]
    assert last["prune/heads_left/bert.encoder.layer.0.attention"] == HEADS // 2
    assert last["prune/neurons_left/bert.encoder.layer.1.intermediate"] == FFN // 2
    assert "prune/sparsity/bert.encoder.layer.0.attention.self.query" in last
    # the target grows monotonically along the ramp
    targets_logged = [m["prune/target_sparsity"] for m in updates]
    assert targets_logged == sorted(targets_logged) and targets_logged[-1] == 0.5


def test_resuming_mid_stage_from_a_lightning_checkpoint_gives_identical_masks(tmp_path):
    # No dropout: the global RNG stream is not in a Lightning checkpoint (run-level resume
    # restores it); here the ramp's own state (masks, Taylor scores, history) is under test.
    full = tiny_bert(dropout=0.0).train()
    ramp_full = ramp_for(full)
    run(full, ramp_full, epochs=3, ckpt_dir=tmp_path / "ck")
    ckpt = tmp_path / "ck" / "epoch=0.ckpt"
    assert ckpt.exists()
    resumed = tiny_bert(
        seed=123, dropout=0.0
    ).train()  # different init: everything must come from the checkpoint
    ramp_res = ramp_for(resumed)
    run(resumed, ramp_res, epochs=3, resume=str(ckpt))
    assert ramp_res.history == ramp_full.history
    assert all(torch.equal(ramp_res.group_keep[k], ramp_full.group_keep[k]) for k in ramp_full.group_keep)
    assert all(torch.equal(ramp_res.masks[k], ramp_full.masks[k]) for k in ramp_full.masks)


def test_pipeline_prunes_heads_and_neurons_shrinks_then_quantizes_and_reloads(make_cfg):
    from dpq.train import train

    cfg = make_cfg(
        "experiment=tiny",
        "pipeline=dpq",
        "pipeline.stages.prune.granularity=heads+neurons",
        "cost.repeats=2",
        "cost.warmup=1",
    )
    results = train(cfg)
    by = {r["stage"]: r for r in results["stages"]}
    prune, distill = by["prune"], by["distill"]
    assert prune["granularity"] == "heads+neurons" and prune["shrunk"] is True
    # tiny_bert: 2 layers x 2 heads, FFN 128 -> 1 head and 64 neurons left per layer
    assert set(prune["structure"]["heads"].values()) == {1}
    assert set(prune["structure"]["neurons"].values()) == {64}
    assert prune["metrics"]["params_total"] < distill["metrics"]["params_total"]
    assert prune["metrics"]["dense_gflops"] < distill["metrics"]["dense_gflops"]
    assert results["final"]["quantized"]
    model = load_model(cfg.model, cfg.task, cfg.paths.output_dir + "/model")
    att = model.bert.encoder.layer[1].attention.self
    assert att.num_attention_heads == 1 and model.bert.encoder.layer[1].intermediate.dense.out_features == 64


def test_a_uniform_neuron_shrink_reloads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_bert()
    x = inputs()
    prune_and_shrink(model, "neurons", 0.5)
    assert model.config.intermediate_size == FFN // 2
    save_model(model, tmp_path / "m")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(logits(model, x), logits(again, x), atol=1e-6, rtol=0)


def test_heads_neurons_experiment_is_the_studys_structured_recipe(make_cfg):
    """conf/experiment/heads_neurons_50.yaml and bench/study.py's dpq_s50 must not drift apart:
    BENCHMARKS.md reports the study's structured point as that experiment's recipe."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "study.py"
    spec = importlib.util.spec_from_file_location("study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    exp = make_cfg("pipeline=dpq", "experiment=heads_neurons_50")
    bench = make_cfg(*study.CONFIGS["dpq_s50"])
    assert exp.pipeline == bench.pipeline
    assert (
        exp.pipeline.stages.prune.criterion == "taylor"
        and exp.pipeline.stages.prune.granularity == "heads+neurons"
    )
