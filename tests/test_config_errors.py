"""User mistakes fail before any training, with one message naming the key, the value and what is allowed."""

import json
import os
import re
import subprocess
import sys

import lightning as L
import pytest

from dpq.core.errors import ConfigError
from dpq.train import train


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started before the config error was raised")

    monkeypatch.setattr(L.Trainer, "fit", boom)


TINY, DIGITS = "experiment=tiny", "experiment=digits"
P = "pipeline.stages"

# (overrides, the key the message names, the bad value as shown, what is allowed).
# "{tmp}" is the test's temporary folder: it holds "three_labels/" (a saved 3-label model's
# config.json), "small_vocab/" (a 2-label model with 1000 tokens), "no_checkpoints/" (a folder that
# is not a run), and "run/results.json" when the case is about an output folder that already holds a run.
CASES = [
    # null where a stage needs a number: refused by name, not a TypeError mid-training
    (
        [TINY, f"{P}.prune.final_sparsity=null"],
        f"{P}.prune.final_sparsity",
        "null",
        "must be a number, not null",
    ),
    ([TINY, f"+{P}.quantize.weight_decay=null"], f"{P}.quantize.weight_decay", "null", "must be a number"),
    ([TINY, f"{P}.distill.epochs=null"], f"{P}.distill.epochs", "null", "must be an integer, not null"),
    (
        [TINY, "logger=wandb", "logger.mode=onlin"],
        "logger.mode",
        "'onlin'",
        "must be one of auto, online, offline",
    ),
    ([TINY, "task.integer_labels=ratings"], "task.integer_labels", "'ratings'", "must be one of ids, names"),
    # objectives a finished run would not have: the weighted sum of no weights, an ONNX figure without export
    (
        [TINY, "objective.metrics=[objective]", "~objective.weights"],
        "objective.metrics",
        "'objective'",
        "the weighted sum of objective.weights, which names no metric",
    ),
    (
        [TINY, "objective.metrics=[onnx_val_accuracy]", "export.onnx=false"],
        "objective.metrics",
        "'onnx_val_accuracy'",
        "needs export.onnx=true",
    ),
    (
        [TINY, "+objective.weights.onnx_size_bytes=-1e-8", "export.onnx=false"],
        "objective.weights.onnx_size_bytes",
        "-1e-08",
        "needs export.onnx=true",
    ),
    ([TINY, "task.max_length=null"], "task.max_length", "null", "a text task cuts its examples at a number"),
    # a weight that is not a number failed in the sum after training, before results.json was written
    (
        [TINY, "++objective.weights.val_accuracy=abc"],
        "objective.weights.val_accuracy",
        "'abc'",
        "finite number",
    ),
    # null folders made ./None, or failed with a TypeError as the teacher cache was read
    ([TINY, "stage_cache.dir=null"], "stage_cache.dir", "null", "must be a folder path"),
    (
        [TINY, "stage_cache.dir=''"],
        "stage_cache.dir",
        "''",
        "must be a folder path (or stage_cache.enabled=false)",
    ),
    ([TINY, "task.split.seed=-3"], "task.split.seed", "-3", "must be an integer >= 0"),
    # another model named while the preset's embedded copy stays installed: the embedded one loaded, unsaid
    (
        [TINY, "teacher=minilm_l6", "teacher.pretrained=google-bert/bert-base-uncased"],
        "teacher.pretrained",
        "'google-bert/bert-base-uncased'",
        "set teacher.embedded=null to load google-bert/bert-base-uncased",
    ),
    # a TypeError after the teacher trained
    (
        [TINY, "teacher=minilm_l6", "model=minilm_l3", "model.layers=1"],
        "model.layers",
        "1",
        "a list of teacher",
    ),
    # 0 steps trained nothing; -7 failed inside Lightning after the teacher trained
    ([TINY, f"+{P}.distill.max_steps=0"], f"{P}.distill.max_steps", "0", "-1 (no cap) or a positive integer"),
    ([TINY, f"+{P}.distill.weight_decay=-0.5"], f"{P}.distill.weight_decay", "-0.5", "must be >= 0"),
    # the FLOPs ramp starts from nothing: an initial sparsity was dropped unsaid
    (
        [
            TINY,
            f"{P}.prune.granularity=heads+neurons",
            f"{P}.prune.flops_target=0.6",
            f"{P}.prune.initial_sparsity=0.1",
        ],
        f"{P}.prune.initial_sparsity",
        "0.1",
        "is not read with flops_target",
    ),
    # null read as accuracy by the check, as 'val_None' by objective.metrics
    ([TINY, "task.primary_metric=null"], "task.primary_metric", "null", "must be"),
    # a position table shorter than the run's inputs: the export would fail after training
    ([TINY, "export.max_positions=10"], "export.max_positions", "10", "must be at least"),
    # stage order and stage names
    (
        [TINY, "pipeline.order=[teacher,distill,prun]"],
        "pipeline.order[2]",
        "'prun'",
        "not a stage of this pipeline",
    ),
    (
        [TINY, "pipeline.order=[teacher,distill,quantize,prune]"],
        "pipeline.order",
        "'prune'",
        "quantization must be the last stage",
    ),
    # the order as written, not the part of it the rule looked at
    (
        [TINY, "pipeline.order=[distill,prune]"],
        "pipeline.order",
        "=['distill', 'prune']:",
        "needs a teacher stage",
    ),
    (
        [TINY, "pipeline.order=[teacher,distill,recover,quantize]"],
        "pipeline.order",
        "=['teacher', 'distill', 'recover', 'quantize']:",
        "needs a prune stage",
    ),
    ([TINY, "pipeline.order=[teacher,distill,distill]"], "pipeline.order", "'distill'", "appears twice"),
    # a block of settings set to null: its keys fell back to built-in defaults, or (cost) the run failed mid-way
    (
        [TINY, "checkpoint=null"],
        "checkpoint",
        "null",
        "e.g. checkpoint.enabled=false to turn checkpoints off",
    ),
    ([TINY, "cost=null"], "cost", "null", "must be a block of cost settings (batch_size,"),
    # null reads as "no recover", yet it ran with the recover kind's dataclass defaults
    (
        [TINY, f"{P}.recover=null"],
        f"{P}.recover",
        "null",
        "must be a block of settings; e.g. pipeline.stages.recover.<setting>=<value> (to drop the stage, leave it "
        "out of pipeline.order ['teacher', 'distill', 'prune', 'recover', 'quantize'])",
    ),
    ([TINY, f"{P}.prune.kind=shrink"], f"{P}.prune.kind", "'shrink'", "unknown stage kind; allowed:"),
    (
        [TINY, f"+{P}.prune.sparsity=0.3"],
        f"{P}.prune.sparsity",
        "0.3",
        "is not a parameter of a prune stage; allowed:",
    ),
    ([TINY, "export.nbits_compute=int4"], "export.nbits_compute", "'int4'", "must be float"),
    # a precision Lightning would swap for another (16-mixed on CPU runs as bf16-mixed)
    ([TINY, "trainer.precision=16-mixed"], "trainer.precision", "'16-mixed'", "would train at bf16-mixed"),
    # feature-KD settings named one by one, not as the distill block
    (
        [TINY, f"{P}.distill.hidden_kind=l1"],
        f"{P}.distill.hidden_kind",
        "'l1'",
        "must be one of ('mse', 'cosine')",
    ),
    (
        [TINY, f"{P}.distill.relation=-1"],
        f"{P}.distill.relation",
        "-1",
        "weight must be a finite number >= 0",
    ),
    # quantize-aware pruning / recovery names a later quantization stage
    (
        [TINY, "pipeline=dpq_qat", f"{P}.prune.qat=quantise"],
        f"{P}.prune.qat",
        "'quantise'",
        "must name the quantization stage (quantize or ptq) that comes later in pipeline.order: quantize",
    ),
    ([TINY, "pipeline=dp", f"{P}.recover.qat=quantize"], f"{P}.recover.qat", "'quantize'", "there is none"),
    (
        [TINY, "pipeline=spiral", f"+{P}.spiral.prune.qat=quantize"],
        f"{P}.spiral.prune.qat",
        "'quantize'",
        "not supported inside spiral rounds",
    ),
    # ranges and types of stage parameters
    ([TINY, f"{P}.prune.final_sparsity=1.2"], f"{P}.prune.final_sparsity", "1.2", "must be in [0, 1)"),
    ([TINY, f"{P}.prune.final_sparsity=-0.1"], f"{P}.prune.final_sparsity", "-0.1", "must be in [0, 1)"),
    (
        [TINY, f"{P}.prune.initial_sparsity=0.6"],
        f"{P}.prune.initial_sparsity",
        "0.6",
        "must be <= final_sparsity",
    ),
    ([TINY, f"{P}.prune.scope=neuron"], f"{P}.prune.scope", "'neuron'", "must be one of layer, global"),
    ([TINY, f"{P}.prune.criterion=random"], f"{P}.prune.criterion", "'random'", "must be one of magnitude"),
    ([TINY, f"{P}.distill.epochs=1.5"], f"{P}.distill.epochs", "1.5", "must be an integer"),
    ([TINY, f"{P}.distill.lr=0"], f"{P}.distill.lr", "0", "must be > 0"),
    ([TINY, f"{P}.distill.alpha=1.5"], f"{P}.distill.alpha", "1.5", "must be in [0, 1]"),
    ([TINY, f"{P}.distill.temperature=0"], f"{P}.distill.temperature", "0", "must be > 0"),
    ([TINY, f"{P}.quantize.bits=5"], f"{P}.quantize.bits", "5", "must be one of"),
    # module selectors must match modules of the student, before anything trains
    (
        [TINY, f"{P}.prune.targets=re:nothing\\.here"],
        f"{P}.prune.targets",
        "'re:nothing\\\\.here'",
        "matches no module",
    ),
    (
        [TINY, f"{P}.prune.targets='re:(a'"],
        f"{P}.prune.targets",
        "'re:(a'",
        "is not a valid regular expression",
    ),
    ([TINY, "model.prune_targets=re:nomatch"], "model.prune_targets", "'re:nomatch'", "matches no module"),
    # LayerNorms are modules, just none that pruning touches: "matches no module" misled
    (
        [TINY, "model.prune_targets=re:.*LayerNorm"],
        "model.prune_targets",
        "'re:.*LayerNorm'",
        "matches 5 module(s) of the BertForSequenceClassification, none an nn.Linear or conv: "
        "bert.embeddings.LayerNorm (LayerNorm)",
    ),
    (
        [TINY, f"{P}.quantize.targets=re:nomatch"],
        f"{P}.quantize.targets",
        "'re:nomatch'",
        "matches no module",
    ),
    (
        [TINY, f"~{P}.prune.overrides", f"+{P}.prune.overrides={{re\\:nomatch:0.7}}"],
        f"{P}.prune.overrides.re:nomatch",
        "0.7",
        "selector matches none of this stage's targets",
    ),
    # models and label counts
    (
        [DIGITS, "model=tiny_bert"],
        "model",
        "'tiny_bert'",
        "is an arch=hf model but task 'digits' (features) needs arch=mlp",
    ),
    # a text input longer than a model's position table: it failed inside the embeddings after training began
    (
        [TINY, "cost.seq_len=129"],
        "cost.seq_len",
        "129",
        "is longer than the 128 positions of the teacher (tiny_bert",
    ),
    (
        [TINY, "task.max_length=200"],
        "task.max_length",
        "200",
        "is longer than the 128 positions of the teacher",
    ),
    # dpq's MLP/CNN have no pretrained weights or teacher layers to start from: init was ignored
    (
        [DIGITS, "model.init=from_teacher"],
        "model.init",
        "'from_teacher'",
        "arch=mlp models start from random",
    ),
    (
        [TINY, "model.init=from_teacher", "+model.layers=[0,9]"],
        "model.layers",
        "[0, 9]",
        "teacher layer indices in [0, 2)",
    ),
    (
        [TINY, f"{P}.teacher.load_from={{tmp}}/three_labels"],
        f"{P}.teacher.load_from",
        "three_labels",
        "is a 3-label model, but task 'rotten_tomatoes' has 2 labels",
    ),
    ([TINY, "task.num_labels=1"], "task.num_labels", "1", "must be an integer >= 2"),
    ([DIGITS, "task.split.validation=null"], "task.split.validation", "null", "not null (leave the key out"),
    # the data is tokenized once, with the teacher's tokenizer: fewer embedding rows fail at the first batch
    (
        [TINY, "model.config.vocab_size=1000"],
        "model.config.vocab_size",
        "1000",
        "gives the student a 1000-token vocabulary and the teacher's has 30522",
    ),
    (
        [TINY, f"+{P}.teacher.ensemble=[{{tmp}}/small_vocab]"],
        f"{P}.teacher.ensemble[0]",
        "small_vocab",
        "has a 1000-token vocabulary and the data is tokenized with teacher's 30522-token one",
    ),
    ([DIGITS, "task.num_labels=5"], "task.num_labels", "5", "labels in the data range over 0..9"),
    # the data
    ([TINY, "task=sst2"], "task", "'sst2'", "online-only"),
    ([DIGITS, "task.num_features=32"], "task.num_features", "32", "the data has 64 features per example"),
    ([TINY, "task.batch_size=0"], "task.batch_size", "0", "must be an integer >= 1"),
    # trainer, devices, tracking
    ([TINY, "trainer.accelerator=tpu2"], "trainer.accelerator", "'tpu2'", "must be one of cpu, gpu, cuda"),
    ([TINY, "trainer.precision=12"], "trainer.precision", "12", "Allowed precision values"),
    ([TINY, "+trainer.warp_speed=9"], "trainer.warp_speed", "9", "is not a lightning.Trainer argument"),
    # Lightning builds a Trainer with these, then fails at the first step / clips nothing, silently
    ([TINY, "+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", "0", "integer >= 1"),
    (
        [TINY, "trainer.gradient_clip_val=-1"],
        "trainer.gradient_clip_val",
        "-1",
        "a negative one clips nothing",
    ),
    ([TINY, "cost.device=tpu"], "cost.device", "'tpu'", "must be one of cpu, cuda, auto"),
    (
        [TINY, "cost.latency_process=elsewhere"],
        "cost.latency_process",
        "'elsewhere'",
        "must be one of separate, same",
    ),
    (
        [TINY, "logger.kind=neptune"],
        "logger.kind",
        "'neptune'",
        "must be one of wandb, csv, tensorboard, none",
    ),
    # run-level switches
    ([TINY, "seed=-3"], "seed", "-3", "must be an integer >= 0"),
    ([TINY, "checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps", "-1", "must be an integer >= 0"),
    ([TINY, "checkpoint.keep=0"], "checkpoint.keep", "0", "must be an integer >= 1"),
    ([TINY, "integrity=maybe"], "integrity", "'maybe'", "must be true or false"),
    ([TINY, "integrity_tolerance=2"], "integrity_tolerance", "2", "must be a number in [0, 1]"),
    # resume and output folders
    ([TINY, "resume=/nonexistent/run"], "resume", "'/nonexistent/run'", "is not a folder"),
    ([TINY, "resume={tmp}/no_checkpoints"], "resume", "no_checkpoints", "holds no dpq checkpoints"),
    # folders the run would write: a file in the way (as a read-only shared cache would be)
    (
        [TINY, "stage_cache.dir={tmp}/three_labels/config.json/stages"],
        "stage_cache.dir",
        "config.json/stages",
        "cannot be made a writable folder (Not a directory); choose another (or stage_cache.enabled=false)",
    ),
    ([TINY], "hydra.run.dir", "run", "already holds another run (results.json)"),
    # stages defined but not in the order: a typo'd name, bad values (a multirun may still set them)
    (
        [TINY, f"+{P}.prun.final_sparsity=0.8"],
        f"{P}.prun",
        "'final_sparsity': 0.8",
        "is not a stage of pipeline.order ['teacher', 'distill', 'prune', 'recover', 'quantize'] and names "
        f"no stage kind (did you mean {P}.prune?)",
    ),
    ([TINY, "pipeline=dq", f"{P}.prune.final_sparsity=1.5"], f"{P}.prune.final_sparsity", "1.5", "[0, 1)"),
    # training length is a stage's, and trainer keys are checked when a strategy defers building it
    ([TINY, "+trainer.max_epochs=5"], "trainer.max_epochs", "5", "training length is set per stage"),
    (
        [TINY, "trainer=ddp_cpu", "+trainer.warp_speed=9"],
        "trainer.warp_speed",
        "9",
        "is not a lightning.Trainer argument",
    ),
    ([TINY, f"{P}.prune.targets=123"], f"{P}.prune.targets", "123", "must be a module name"),
    (
        [TINY, f"{P}.teacher.load_from={{tmp}}/no_checkpoints"],
        f"{P}.teacher.load_from",
        "no_checkpoints",
        "no config.json",
    ),
    ([TINY, "task=_base"], "run_name", "${task.name}", "such as task=_base holds the defaults"),
    # structured kinds the model lacks, min_keep against its counts: before the teacher and distill train
    (
        [TINY, f"{P}.prune.granularity=channels"],
        f"{P}.prune.granularity",
        "'channels'",
        "the model has no channels",
    ),
    (
        [TINY, f"{P}.prune.granularity=heads", f"{P}.prune.min_keep=100"],
        f"{P}.prune.min_keep",
        "100",
        "has only 2 heads; must be < 2",
    ),
    # switches are true or false, numbers finite and not booleans
    ([TINY, f"{P}.teacher.cache=maybe"], f"{P}.teacher.cache", "'maybe'", "must be true or false"),
    ([TINY, "stage_cache.enabled=maybe"], "stage_cache.enabled", "'maybe'", "must be true or false"),
    ([TINY, "task.group_by_length=maybe"], "task.group_by_length", "'maybe'", "must be true or false"),
    ([TINY, f"{P}.distill.lr=inf"], f"{P}.distill.lr", "inf", "must be a finite number"),
    ([TINY, f"{P}.distill.epochs=true"], f"{P}.distill.epochs", "True", "must be a finite number"),
    # an ensemble is a list of folders, weighted by numbers
    (
        [TINY, f"+{P}.teacher.ensemble=/tmp"],
        f"{P}.teacher.ensemble",
        "'/tmp'",
        "must be a list of saved model",
    ),
    (
        [TINY, f"+{P}.teacher.ensemble_weights=[1,abc]"],
        f"{P}.teacher.ensemble_weights",
        "[1, 'abc']",
        "needs 1 non-negative numbers",
    ),
    ([TINY, "export.threads=some"], "export.threads", "'some'", "or auto (the threads PyTorch's latency"),
    (
        [TINY, "task.split.validation=1.5"],
        "task.split.validation",
        "1.5",
        "must be a fraction in (0, 1) or a number",
    ),
    (
        [TINY, f"{P}.distill.hidden=1.0", f"{P}.distill.layer_map=[9,9]"],
        f"{P}.distill.layer_map",
        "[9, 9]",
        "teacher layer must be an integer in 1..2",
    ),
    (
        [
            TINY,
            f"{P}.quantize.granularity=per_group",
            f"{P}.quantize.bits=8",
            f"{P}.quantize.group_size=24",
            "export.onnx=true",
        ],
        f"{P}.quantize.group_size",
        "24",
        "8-bit codes export to ONNX Runtime's MatMulNBits, whose blocks are powers of two >= 16",
    ),
    (
        [
            TINY,
            f"{P}.prune.granularity=heads+neurons",
            f"+{P}.prune.overrides={{re\\:.*output\\.dense:0.75}}",
        ],
        f"{P}.prune.overrides.re:.*output\\.dense",
        "0.75",
        "a layer's fraction is set on the first module of each group set",
    ),
    # keys dpq would not read
    ([TINY, "+sed=43"], "sed", "43", "is not a run setting (did you mean seed?)"),
    (
        [TINY, "+cost.batchsize=8"],
        "cost.batchsize",
        "8",
        "is not a cost setting (did you mean cost.batch_size?)",
    ),
    (
        [TINY, "+task.max_lenght=32"],
        "task.max_lenght",
        "32",
        "is not a task setting (did you mean task.max_length?)",
    ),
    (
        [TINY, "+task.split.sed=3"],
        "task.split.sed",
        "3",
        "is not a task.split setting (did you mean task.split.seed?)",
    ),
    (
        [TINY, "+logger.projet=x"],
        "logger.projet",
        "'x'",
        "is not a logger setting (did you mean logger.project?)",
    ),
    (
        [TINY, "+teacher.pretrainde=x"],
        "teacher.pretrainde",
        "'x'",
        "is not a teacher setting (did you mean teacher.pretrained?)",
    ),
    # the hub block is read only when the embedded copy is missing: a typo there is caught anyway,
    # since it would load the newest data (revision) or the default splits without a word
    (
        [TINY, "+task.hub.revison=a1b2c3"],
        "task.hub.revison",
        "'a1b2c3'",
        "is not a hub setting (did you mean task.hub.revision?); allowed: path, name, splits, revision",
    ),
    (
        [TINY, "+task.hub.splits.valid=validation"],
        "task.hub.splits.valid",
        "'validation'",
        "not a split; splits are train, validation, test",
    ),
    # a Hugging Face config setting the model does not have (transformers would keep it as a loose attribute)
    (
        [TINY, "+model.config.hiden_size=32"],
        "model.config.hiden_size",
        "32",
        "is not a BertConfig setting (did you mean model.config.hidden_size?)",
    ),
    # a block or list given a scalar: said by name, not a TypeError from the first check that reads inside it
    ([TINY, "cost=5"], "cost", "5", "must be a block of cost settings (batch_size, device, latency_process,"),
    ([TINY, "pipeline.name=null"], "pipeline.name", "null", "must be a non-empty string"),  # ran as 'None'
    # a scalar where a list of teacher layers belongs: a TypeError traceback
    (
        [TINY, f"{P}.distill.layer_map=5"],
        f"{P}.distill.layer_map",
        "5",
        "must be a list of 1-based teacher layers",
    ),
    (
        [TINY, f"{P}.prune=0.5"],
        f"{P}.prune",
        "0.5",
        "must be a block of settings; e.g. pipeline.stages.prune.<",
    ),
    (
        [TINY, "objective.metrics=val_accuracy"],
        "objective.metrics",
        "'val_accuracy'",
        "must be a list of metric",
    ),
    # an interpolation that cannot be resolved: its key and what it says, before anything loads
    ([TINY, "run_name=${nope}"], "run_name", "${nope}", "lacks (Interpolation key 'nope' not found)"),
    (
        [TINY, "run_name=${oc.env:DPQ_NO_SUCH_VARIABLE}"],
        "run_name",
        "${oc.env:DPQ_NO_SUCH_VARIABLE}",
        'cannot be resolved: KeyError raised while resolving interpolation: "Environment variable',
    ),
    # an empty target list selects nothing (the quantize stage says so too)
    ([TINY, f"{P}.prune.targets=[]"], f"{P}.prune.targets", "[]", "must name at least one module"),
    # a second prune stage whose target the first already reached: it would prune nothing (masks stay frozen)
    (
        [
            TINY,
            "pipeline.order=[teacher,distill,prune,recover,prune2,quantize]",
            f"+{P}.prune2={{kind:prune,final_sparsity:0.3}}",
        ],
        f"{P}.prune2.final_sparsity",
        "0.3",
        "prunes nothing: stage 'prune' before it already leaves 0.5 of the same targets pruned",
    ),
    # the classifier's labels are the task's: num_labels twice to transformers was a TypeError after the
    # teacher trained
    ([TINY, "+model.config.num_labels=3"], "model.config.num_labels", "3", "is set by the task"),
    # an unknown model type, and settings the model refuses, were said only after the teacher trained
    ([TINY, "model.model_type=bertt"], "model.model_type", "'bertt'", "is not a transformers model type"),
    (
        [TINY, "model.config.hidden_size=30", "model.config.num_attention_heads=4"],
        "model.config",
        "'hidden_size': 30",
        "builds no model: The hidden size (30) is not a multiple",
    ),
    # native model widths and dropout: a width 0 trained a head of its bias alone, the rest raised raw errors
    ([DIGITS, "model.hidden=[0]"], "model.hidden", "[0]", "must be a list of positive integers"),
    ([DIGITS, "model.hidden=64"], "model.hidden", "64", "must be a list of positive integers"),
    ([DIGITS, "model.dropout=1.5"], "model.dropout", "1.5", "must be a number in [0, 1)"),
    # pools that shrink the image below one pixel failed in the first forward, after the teacher trained
    (
        [
            "experiment=fashion_cnn",
            "model.channels=[4,4,4,4,4,4]",
            "model.pool=[true,true,true,true,true,false]",
        ],
        "model.pool",
        "[True, True, True, True, True, False]",
        "block 4 would pool a 1x1 map (the 28x28 image after 4 pools)",
    ),
    # a pretrained model whose config override changes its weights' shapes: a RuntimeError at loading
    (
        ["teacher=minilm_l6", "+teacher.config.intermediate_size=256", "trainer=debug"],
        "teacher.config.intermediate_size",
        "256",
        "changes the shapes of the pretrained weights, which then cannot load",
    ),
    # reviewed 2026-12-08: raw tracebacks, values accepted then failing after training, or silently wrong
    ([TINY, "task.num_labels=2.5"], "task.num_labels", "2.5", "must be an integer >= 2"),
    ([TINY, "cost.seq_len=200.0"], "cost.seq_len", "200.0", "must be an integer >= 1"),  # skipped positions
    ([TINY, "export.threads=2.0"], "export.threads", "2.0", "must be an integer >= 1 or auto"),
    ([TINY, "export.compact=no"], "export.compact", "'no'", "must be true or false"),  # a true string
    (
        [TINY, "task.integer_labels=false"],
        "task.integer_labels",
        "False",
        "must be one of ids, names",
    ),  # read as ids
    ([TINY, "trainer.gradient_clip_val=nan"], "trainer.gradient_clip_val", "nan", "must be a number >= 0"),
    (
        [TINY, "+pipeline.stages.extra.kind=[a]"],
        "pipeline.stages.extra",
        "'kind': ['a']",
        "names no stage kind",
    ),
    (
        [TINY, "objective.metrics=[[val_accuracy]]"],
        "objective.metrics",
        "['val_accuracy']",
        "must be metric names",
    ),
    ([TINY, "~trainer"], "trainer", "null", "is missing: the run needs its trainer block"),
    (
        [TINY, "logger=wandb", "logger.tags=baseline"],
        "logger.tags",
        "'baseline'",
        "must be a list of strings",
    ),
    ([TINY, "trainer=ddp_cpu", "trainer.devices=abc"], "trainer.devices", "'abc'", "must be a device count"),
    # a distributed trainer's other values were not checked: 16-mixed trained at bf16-mixed on CPU, unsaid
    (
        [TINY, "trainer=ddp_cpu", "trainer.precision=16-mixed"],
        "trainer.precision",
        "'16-mixed'",
        "would train at bf16-mixed",
    ),
    (
        [TINY, f"{P}.teacher.load_from=3"],
        f"{P}.teacher.load_from",
        "3",
        "must be a saved model folder (a path)",
    ),
    ([TINY, f"+{P}.teacher.ensemble=[3]"], f"{P}.teacher.ensemble[0]", "3", "must be a saved model folder"),
    # cost settings deleted from the config: a KeyError after the first stage trained
    ([TINY, "~cost.repeats"], "cost.repeats", "null", "is missing: cost needs an integer >= 1"),
    # trainer callbacks and plugins: each stage's Trainer is built with dpq's own, which replaced these unsaid
    (
        [TINY, "+trainer.callbacks=[{_target_:lightning.pytorch.callbacks.EarlyStopping,monitor:val_loss}]"],
        "trainer.callbacks",
        "EarlyStopping",
        "is built by dpq for each stage",
    ),
    # any string but "warn" is "not deterministic" to Lightning
    (
        [TINY, "trainer.deterministic=yes"],
        "trainer.deterministic",
        "'yes'",
        "must be true, false, warn or null",
    ),
    # a spiral's round targets as one number, or with a word in them: raw TypeError / ValueError
    (
        [TINY, "pipeline=spiral", f"{P}.spiral.rounds=1", f"{P}.spiral.round_targets=0.5"],
        f"{P}.spiral.round_targets",
        "0.5",
        "must be a list of sparsities, one per round",
    ),
    # a random-init model has no tokenizer of its own (the real run blamed teacher.pretrained)
    ([TINY, "teacher.tokenizer=null"], "teacher.tokenizer", "null", "has no tokenizer of its own"),
    # a hub student that cannot be loaded (offline, or no such id): said before the teacher trains
    (
        [TINY, "model=distilbert", "model.pretrained=dpq-no-such-org/no-such-model"],
        "model.pretrained",
        "'dpq-no-such-org/no-such-model'",
        "could not be resolved to a commit of dpq-no-such-org/no-such-model: the hub is unreachable",
    ),
]


@pytest.mark.parametrize(
    "overrides, key, value, allowed", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_config_fails_before_training(make_cfg, tmp_path, overrides, key, value, allowed):
    (tmp_path / "three_labels").mkdir()
    (tmp_path / "three_labels" / "config.json").write_text(json.dumps({"dpq_arch": "mlp", "num_labels": 3}))
    (tmp_path / "no_checkpoints").mkdir()
    (tmp_path / "small_vocab").mkdir()
    (tmp_path / "small_vocab" / "config.json").write_text(json.dumps({"num_labels": 2, "vocab_size": 1000}))
    if key == "hydra.run.dir":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "results.json").write_text("{}")
    cfg = make_cfg(*[o.replace("{tmp}", str(tmp_path)) for o in overrides])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert err.value.key == key, msg
    assert msg.startswith(f"{key}="), msg  # the key, then the value as given
    assert value in msg.split(":", 1)[0] + msg, msg
    assert allowed in msg, msg


def test_a_null_cache_folder_is_refused_by_name(tmp_path):
    from dpq.run.validate import check_folders

    with pytest.raises(ConfigError, match=r"paths.cache_dir=null: must be a folder path \(default \$DPQ"):
        check_folders({"paths": {"output_dir": str(tmp_path / "run"), "cache_dir": None}})
    check_folders({"paths": {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "c")}})


def test_there_are_at_least_25_distinct_cases():
    assert len(CASES) >= 25 and len({c[1] for c in CASES}) >= 25


def run_cli(tmp_path, *overrides):
    env = {**os.environ, "DPQ_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dpq.train", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )


# Each case starts a Python process (~10 s on 2 cores): one in the fast suite, the others slow.
@pytest.mark.parametrize(
    "overrides, line",
    [
        (["pipeline.order=[teacher,distill,quantize,prune]"], "dpq: config error: pipeline.order="),
        (  # Hydra's own refusal would advise +pipeline.stages.prune.final_sparsty=0.5, adding the typo
            ["pipeline.stages.prune.final_sparsty=0.5"],
            "dpq: config error: pipeline.stages.prune.final_sparsty=0.5: is not a pipeline.stages.prune setting "
            "(did you mean pipeline.stages.prune.final_sparsity?)",
        ),
        pytest.param(
            ["trainer.precision=12"],
            "dpq: config error: trainer.precision=12: Precision 12 is invalid",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["resume={tmp}/run", "pipeline.stages.prune.final_sparsity=0.9"],
            "dpq: config error: resume='{tmp}/run': continues a run with the config it started with",
            marks=pytest.mark.slow,
        ),
        pytest.param(  # Hydra's record of the overrides resolved the interpolation inside one, and failed
            ["run_name=${nope}"],
            "dpq: config error: run_name='${nope}': refers to a key the composed config lacks",
            marks=pytest.mark.slow,
        ),
        pytest.param(  # read by the check of stage overrides that runs before the config's own checks
            ["pipeline.stages=5"],
            "dpq: config error: pipeline.stages=5: must be a block of settings",
            marks=pytest.mark.slow,
        ),
        pytest.param(  # a mistyped folder: said before Hydra would create it as the run folder
            ["resume={tmp}/rnu"],
            "dpq: config error: resume='{tmp}/rnu': no such folder",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_cli_prints_one_clear_line_and_exits_2(tmp_path, overrides, line):
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    (tmp_path / "run").mkdir()
    proc = run_cli(tmp_path, "experiment=tiny", "logger=none", f"hydra.run.dir={tmp_path}/new", *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert line.replace("{tmp}", str(tmp_path)) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "rnu").exists()


@pytest.mark.parametrize(
    "argv, key, said",
    [
        (
            ["pipeline=dqp"],
            "pipeline",
            "is not a pipeline option (did you mean pipeline=dq?); allowed: dense, dp,",
        ),
        (
            ["-m", "pipeline=dq,spiral,dqp", "seed=1,2"],
            "pipeline",
            "did you mean pipeline=dq?",
        ),  # each swept value
        (["experiment=tiny", "sed=43"], "sed", "is not a run setting (did you mean seed?); allowed: task,"),
        (
            ["pipline.order=[a]"],
            "pipline.order",
            "pipline is not a run setting (did you mean pipeline.order?)",
        ),
        (["pipeline=dq", f"{P}.prnue.epochs=2"], f"{P}.prnue.epochs", f"(did you mean {P}.prune.epochs?)"),
        (["task.hub.revision=v1"], "task.hub.revision", "is added with +task.hub.revision=..."),
        # a key inside a mapping value: named as the key it is, not as the mapping
        (["task.split={valdation:0.2}"], "task.split.valdation", "(did you mean 'validation'?)"),
        (  # a selector is one key, dots and all; + merges (the preset's selector stays), ~ then + replaces
            ["experiment=deploy70mix", f"{P}.prune.overrides={{re\\:.*query:0.3}}"],
            f"{P}.prune.overrides.re:.*query",
            f"to add keys, +{P}.prune.overrides={{re\\:.*query:0.3}} (the configured ones stay); to replace it,"
            f" '~{P}.prune.overrides' '+{P}.prune.overrides={{re\\:.*query:0.3}}'",
        ),
        # a weighted sum given as a mapping: Hydra would merge it into the default weights
        (
            ["objective.weights={val_accuracy:1.0}"],
            "objective.weights",
            "name every weight (objective.weights={val_accuracy:1.0,effective_gflops:0})",
        ),
        (
            ["task.primary_metric=f1", "+objective.weights={val_f1:1.0}"],  # + merges as well
            "objective.weights",
            "replace the mapping: '~objective.weights' '+objective.weights={val_f1:1.0}'",
        ),
        # a config group set to null: Hydra's ValueError with a traceback (for the optional groups too)
        (["model=null"], "model", "model=null: choose one of the model options: cnn_small,"),
        # a nested group is named as typed (hydra.sweeper is a config node, not the group)
        (["hydra/sweeper=optun"], "hydra/sweeper", "is not a hydra/sweeper option"),
        (["-m", "model=tiny_bert,null"], "model", "choose one of the model options"),
        (
            ["experiment=null"],
            "experiment",
            "is the default (no experiment): leave the override out, or choose",
        ),
    ],
)
def test_a_mistyped_key_or_option_on_the_command_line_gets_dpqs_message_not_hydras(argv, key, said):
    from dpq.run.overrides import check_command_line

    with pytest.raises(ConfigError) as err:
        check_command_line(argv)
    assert err.value.key == key and said in str(err.value), str(err.value)


def test_each_swept_value_keeps_the_prefix_it_was_written_with():
    from dpq.run.overrides import variants

    assert variants(["+seed=1,2", "~task.split", "++a=3"]) == [
        ["+seed=1", "~task.split", "++a=3"],
        ["+seed=2", "~task.split", "++a=3"],
    ]


def test_the_command_line_check_passes_what_hydra_composes_and_leaves_flags_to_hydra(tmp_path):
    from dpq.run.overrides import check_command_line

    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "tickets.yaml").write_text("defaults: [_base, _self_]\nname: tickets\n")
    for argv in (
        [],
        ["experiment=tiny", "pipeline=dq,dpq", "seed=1,2", "-m", "logger=csv"],
        ["+task.hub.revision=v1", f"{P}.prune.final_sparsity=0.8", "hydra.run.dir=/tmp/x"],
        [f"{P}.distill.alpha=interval(0.2,0.8)", "hparams_search=pareto_bayes"],  # Optuna's search space
        ["--config-dir", str(tmp_path), "task=tickets"],  # a user's own task
        ["--cfg", "job", "sed=1"],  # a flag: Hydra's business, as before
        ["objective.weights={val_accuracy:2.0,effective_gflops:0}", "task.split={validation:0.2}"],
        ["~objective.weights", "+objective.weights={val_accuracy:1.0}"],  # the mapping replaced
    ):
        check_command_line(argv)
    with pytest.raises(ConfigError, match="task='tickets': is not a task option"):
        check_command_line(["task=tickets"])  # without the user's folder Hydra cannot find it either
    # with it, a typo is matched against the user's options too (the list held only dpq's own)
    with pytest.raises(
        ConfigError, match=r"task='tickts': is not a task option \(did you mean task=tickets\?\)"
    ):
        check_command_line(["--config-dir", str(tmp_path), "task=tickts"])
    with pytest.raises(ConfigError, match=r"task=null: choose one of the task options: .*sst2, tickets"):
        check_command_line(["--config-dir", str(tmp_path), "task=null"])


def test_overrides_of_stages_not_in_the_order_are_warned_about(caplog):
    """pipeline=dq_ptq quantizes with its ptq stage: quantize.bits=8 would change nothing, said before training
    (a warning, not an error: a multirun over pipeline=dq,dpq sets the prune stage for both)."""
    from dpq.run.validate import unused_stage_overrides

    pipeline = {"name": "dq_ptq", "order": ["teacher", "distill", "ptq"], "stages": {}}
    overrides = [
        "pipeline=dq_ptq",
        f"{P}.quantize.bits=8",
        f"+{P}.ptq.bits=8",
        f"{P}.prune.final_sparsity=0.5",
    ]
    with caplog.at_level("WARNING"):
        out = unused_stage_overrides(pipeline, overrides)
    assert [m.split(" has no effect")[0] for m in out] == [
        f"{P}.quantize.bits=8",
        f"{P}.prune.final_sparsity=0.5",
    ]
    assert (
        "stage 'quantize' is not in pipeline.order ['teacher', 'distill', 'ptq'] (pipeline dq_ptq)" in out[0]
    )
    assert out[0] in caplog.text
    # the spiral reads ${..prune.final_sparsity}: setting the prune block as a whole has an effect too
    spiral = {
        "name": "spiral",
        "order": ["teacher", "spiral"],
        "stages": {"spiral": {"final_sparsity": "${..prune.final_sparsity}"}},
    }
    assert unused_stage_overrides(spiral, [f"{P}.prune={{final_sparsity:0.3}}"]) == []
    assert unused_stage_overrides(spiral, [f"{P}.prune.lr=1e-5"]) != []


def test_the_known_run_keys_are_the_composed_defaults(tmp_path):
    """RUN_KEYS (what check_known_keys allows) follows the config: a key added to conf/train.yaml goes there too."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from dpq.run.validate import RUN_KEYS

    cfg = compose_cfg(tmp_path, ["logger=wandb"])
    assert set(RUN_KEYS[""]) - {"hydra"} == set(cfg)
    for block in ("cost", "stage_cache", "objective", "logger", "pipeline", "task.split"):
        node = OmegaConf.select(cfg, block)
        assert set(RUN_KEYS[block]) == set(node), block


def test_config_settings_a_from_teacher_student_does_not_use_are_warned_about(tmp_path, caplog):
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from dpq.run.validate import check_models
    from dpq.stages import build_stages

    over = ["teacher=minilm_l6", "model=minilm_l3", "+model.config.hidden_dropout_prob=0.2"]
    cfg = OmegaConf.to_container(compose_cfg(tmp_path, [TINY, *over]), resolve=True)
    cfg["task"]["num_labels"] = 2
    with caplog.at_level("WARNING"):
        check_models(cfg, build_stages(cfg["pipeline"]))
    assert "model.config={'hidden_dropout_prob': 0.2} is not used with init=from_teacher" in caplog.text


def test_every_key_of_the_shipped_tasks_and_models_is_known():
    """check_known_keys refuses what RUN_KEYS lacks: every key a shipped task, model or teacher file
    sets must be there (and a task or model file added with a new key adds it)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from dpq.run.validate import RUN_KEYS

    for group, block in (("task", "task"), ("model", "model"), ("teacher", "teacher")):
        for f in sorted((Path(__file__).resolve().parents[1] / "conf" / group).glob("*.yaml")):
            keys = set(OmegaConf.load(f)) - {"defaults"}
            assert keys <= set(RUN_KEYS[block]), (f.name, keys - set(RUN_KEYS[block]))


def test_a_stage_setting_a_stage_in_the_order_reads_is_not_warned_about(tmp_path):
    """The spiral reads the prune stage's target, granularity, criterion... through interpolations
    (conf/pipeline/spiral.yaml), so sweeping pipeline.stages.prune.final_sparsity over spiral runs has an effect."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from dpq.run.validate import unused_stage_overrides

    cfg = compose_cfg(tmp_path, ["pipeline=spiral", f"{P}.prune.final_sparsity=0.3"])
    assert OmegaConf.to_container(cfg, resolve=True)["pipeline"]["stages"]["spiral"]["final_sparsity"] == 0.3
    raw = OmegaConf.to_container(cfg.pipeline, resolve=False)
    ok = [f"{P}.prune.final_sparsity=0.3", f"{P}.prune.obs.block_size=16", f"{P}.prune.granularity=heads"]
    assert unused_stage_overrides(raw, ok) == []
    assert (
        len(unused_stage_overrides(raw, [f"{P}.prune.epochs=5", f"{P}.quantize.bits=8"])) == 1
    )  # epochs only


def test_a_failed_trial_returns_the_worst_value_of_each_objective():
    """Under a multirun a diverged trial returns these instead of exiting, so one bad trial does not end
    an Optuna study (NaN would fail Optuna's tell; an exit would stop Hydra's launcher)."""
    from omegaconf import OmegaConf

    from dpq.train import worst_values

    one = OmegaConf.create({"objective": {"metrics": ["val_accuracy"]}})
    two = OmegaConf.create({"objective": {"metrics": ["val_accuracy", "effective_gflops"]}})
    assert worst_values(one, "maximize") == float("-inf") and worst_values(one, None) == float("-inf")
    assert worst_values(two, OmegaConf.create(["maximize", "minimize"])) == [float("-inf"), float("inf")]


@pytest.mark.parametrize(
    "overrides, warned",
    [
        ([f"{P}.quantize.bits=8"], True),  # per-channel weight-only 8-bit: integer kernels, not exact
        ([f"{P}.quantize.bits=8", f"{P}.quantize.granularity=per_tensor"], True),
        (
            [f"{P}.quantize.bits=8", f"{P}.quantize.granularity=per_group", f"{P}.quantize.group_size=16"],
            False,
        ),
        ([f"{P}.quantize.bits=4"], False),  # MatMulNBits on float activations: exact
        ([f"{P}.quantize.bits=8", f"{P}.quantize.act_bits=8", f"{P}.quantize.act_range=dynamic"], False),
        ([f"{P}.quantize.bits=8", "export.onnx=false"], False),
    ],
)
def test_weight_only_8_bit_codes_are_warned_to_export_inexactly(tmp_path, caplog, overrides, warned):
    """Said before training: the export rounds the activations of 8-bit weight-only codes, which the model
    never did, and per_group is the exact form (bench/weight_only_export.py measured both)."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from dpq.run.validate import validate

    cfg = OmegaConf.to_container(compose_cfg(tmp_path, [TINY, "pipeline=dq", *overrides]), resolve=True)
    with caplog.at_level("WARNING"):
        validate(cfg)
    said = [r.getMessage() for r in caplog.records if "weight-only codes export" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert (
            said[0].startswith(f"{P}.quantize: 8-bit")
            and "granularity=per_group exports them exactly" in said[0]
        )


@pytest.mark.parametrize("group, wide", [(256, 12), (128, 10), (64, 0)])
def test_a_group_wider_than_a_layers_input_is_warned_before_training(tmp_path, caplog, group, wide):
    """tiny_bert's quantized layers read 64 inputs (Q/K/V, attention output, intermediate: 10 of them) or
    128 (the FFN output: 2): a wider group is one scale per row, which the user did not ask for."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from dpq.run.validate import check_models
    from dpq.stages import build_stages

    over = [f"{P}.quantize.granularity=per_group", f"{P}.quantize.group_size={group}"]
    cfg = OmegaConf.to_container(compose_cfg(tmp_path, [TINY, "pipeline=dq", *over]), resolve=True)
    with caplog.at_level("WARNING"):
        check_models(cfg, build_stages(cfg["pipeline"]))
    said = [r.getMessage() for r in caplog.records if "is wider than the input" in r.getMessage()]
    assert len(said) == (1 if wide else 0), said
    if wide:
        assert said[0].startswith(
            f"{P}.quantize.group_size={group} is wider than the input of {wide} of the 12"
        )
        assert "bert.encoder.layer.0.attention.self.query (64)" in said[0] and said[0].endswith(
            "a group_size below 64 gives each of them several"
        )


def test_a_grid_multirun_lists_every_job_as_the_basic_sweeper_will_run_them(tmp_path):
    from hydra import compose, initialize_config_dir

    from dpq.core.config import CONF_DIR
    from dpq.run.multirun import check_job, sweep_jobs

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        grid = compose("train", overrides=["hparams_search=far_front"], return_hydra_config=True)
        assert len(sweep_jobs(grid)) == 2 * 5 * 3  # conf/hparams_search/far_front.yaml
        grid.hydra.overrides.task.append(
            "seed=1,2"
        )  # as `-m ... seed=1,2` leaves it (compose refuses sweeps)
        jobs = sweep_jobs(grid)
        assert (
            len(jobs) == 2 * 5 * 2
        )  # experiments x pipelines x the command line's seeds (they replace 42-44)
        assert jobs[0][:3] == ["experiment=far_u80", "pipeline=dq", "seed=1"] and "seed=2" in jobs[1]
        check_job("train", jobs[-1])
        with pytest.raises(ConfigError, match="final_sparsity=1.5: must be in"):
            check_job("train", [*jobs[0], f"{P}.prune.final_sparsity=1.5"])
        # an interpolation in an override is read as typed (listing the jobs resolved it, and failed)
        grid.hydra.overrides.task.append("run_name=${nope}")
        jobs = sweep_jobs(grid)
        assert len(jobs) == 2 * 5 * 2 and jobs[0][-1].startswith("run_name=")  # as Hydra escapes it
        with pytest.raises(ConfigError, match="Interpolation key 'nope' not found"):
            check_job("train", jobs[0])
        optuna = compose("train", overrides=["hparams_search=pareto_bayes"], return_hydra_config=True)
        assert sweep_jobs(optuna) is None  # sampled as it goes: each trial checks itself


def test_a_glob_multirun_is_checked_job_by_job_before_any_trains(tmp_path):
    """glob() needs Hydra's config loader to list a group's options; parsed without it the check raised,
    Hydra turned that into a warning, and job #0 trained before job #1 failed on its config."""
    cmd = [
        sys.executable,
        "-m",
        "dpq.train",
        "-m",
        "pipeline=glob(dp)",
        "experiment=tiny",
        "logger=none",
        "dry_run=true",
        f"{P}.prune.final_sparsity=0.3,1.5",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "config error in multirun job #1" in proc.stderr and "final_sparsity=1.5: must be in" in proc.stderr
    )
    assert "none of the 2 jobs was started" in proc.stderr and "ConfigLoader is not set" not in proc.stderr


@pytest.mark.parametrize(
    "overrides, said",
    [
        (["hparams_search=pareto_multi", "objective.metrics=[val_accuracy]"], "needs one direction per"),
        (["hparams_search=pareto_bayes", "objective.metrics=[val_accuracy,effective_gflops]"], "needs one"),
        (
            ["hparams_search=pareto_multi", "hydra.sweeper.direction=[maximize,minimise]"],
            "maximize or minimize",
        ),
        (["hparams_search=pareto_bayes", "hydra.sweeper.n_trials=0"], "n_trials=0: must be an integer >= 1"),
        (["hparams_search=pareto_bayes", "dry_run=true"], "dry_run=True: trains nothing, so an Optuna study"),
        # a direction against the metric's sense: the study would search for the worst model
        (
            ["hparams_search=pareto_multi", "objective.metrics=[effective_gflops,val_accuracy]"],
            "direction[0]='maximize': objective.metrics[0]='effective_gflops' is better lower: minimize it",
        ),
        (
            ["hparams_search=pareto_bayes", "objective.metrics=[val_loss]"],
            "direction[0]='maximize': objective.metrics[0]='val_loss' is better lower",
        ),
    ],
)
def test_an_optuna_study_whose_trials_could_only_fail_is_refused_before_the_first(overrides, said):
    """Objectives and directions that disagree fail in the sweeper only after each trial has trained."""
    from hydra import compose, initialize_config_dir

    from dpq.core.config import CONF_DIR
    from dpq.run.multirun import check_sweeper

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for fine in (
            "hparams_search=pareto_bayes",
            "hparams_search=pareto_multi",
            "hparams_search=orderings",
        ):
            check_sweeper(compose("train", overrides=[fine], return_hydra_config=True))
        with pytest.raises(ConfigError, match=re.escape(said)):
            check_sweeper(compose("train", overrides=overrides, return_hydra_config=True))


@pytest.mark.slow
def test_a_bad_job_in_a_grid_multirun_stops_it_before_any_job_trains(tmp_path):
    env = {**os.environ, "DPQ_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dpq.train", "-m", TINY, "logger=none", f"hydra.sweep.dir={tmp_path}/sweep"]
        + [f"{P}.prune.final_sparsity=0.3,1.5"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "dpq: config error in multirun job #1 (" in proc.stderr
        and "final_sparsity=1.5: must be in" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep").exists()  # job #0 never started


def test_a_roberta_style_position_table_holds_two_rows_fewer_inputs():
    """RoBERTa counts positions from padding_idx + 1: 66 rows take inputs of at most 64 tokens."""
    import torch
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    from dpq.run.validate import check_positions

    config = RobertaConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=66,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    cfg = {"task": {"max_length": 64}, "cost": {"seq_len": 64}, "teacher": {"name": "r"}}
    check_positions(cfg, {"teacher": model})
    cfg["cost"]["seq_len"] = 65
    with pytest.raises(
        ConfigError, match=r"cost.seq_len=65: is longer than the 64 positions of the teacher \(r: "
    ):
        check_positions(cfg, {"teacher": model})


@pytest.mark.parametrize(
    "second, refused, warned",
    [
        ({"final_sparsity": 0.5}, True, False),  # the same target: nothing left to prune
        ({"final_sparsity": 0.8}, False, True),  # further, but the ramp starts at 0: idle until it passes 0.5
        ({"final_sparsity": 0.8, "initial_sparsity": 0.5}, False, False),
        ({"final_sparsity": 0.3, "scope": "global"}, False, False),  # another measure: layers below 0.3 exist
        ({"final_sparsity": 0.3, "targets": "re:.*intermediate.*"}, False, False),  # other modules
        ({"final_sparsity": 0.3, "granularity": "heads"}, False, False),  # groups, not weights
    ],
)
def test_a_second_prune_stage_continues_from_the_sparsity_the_first_leaves(second, refused, warned, caplog):
    """The first stage's masks stay frozen in the second, so on the same targets, scope and granularity the
    second's final_sparsity must exceed the first's, and a ramp starting below it idles until it passes it."""
    from dpq.stages import build_stages
    from dpq.stages.prune import warn_idle_ramps

    pipeline = {
        "order": ["prune", "prune2"],
        "stages": {
            "prune": {"kind": "prune", "final_sparsity": 0.5, "alpha": 0.0},
            "prune2": {"kind": "prune", "alpha": 0.0, **second},
        },
    }
    with caplog.at_level("WARNING", logger="dpq.stages.prune"):
        if refused:
            with pytest.raises(ConfigError, match="prunes nothing") as err:
                build_stages(pipeline)
            assert err.value.key == "pipeline.stages.prune2.final_sparsity"
        else:
            warn_idle_ramps(build_stages(pipeline))
    assert ("the ramp prunes nothing until its target passes 0.5" in caplog.text) == warned, caplog.text


@pytest.mark.parametrize(
    "order, spiral, key",
    [
        (["prune", "spiral"], {}, "pipeline.stages.spiral.initial_sparsity"),  # round 0 to 0.167 under 0.5
        (["spiral", "prune"], {"final_sparsity": 0.5}, "pipeline.stages.prune.final_sparsity"),
        (["prune", "spiral"], {"initial_sparsity": 0.5, "final_sparsity": 0.8}, None),  # continues from 0.5
        (["spiral", "prune"], {"final_sparsity": 0.3}, None),  # the prune stage goes on to 0.5
    ],
)
def test_a_spiral_and_a_prune_stage_continue_from_each_others_sparsity(order, spiral, key):
    """The masks a spiral's last round leaves, and those it finds, stay frozen like a prune stage's."""
    from dpq.stages import build_stages

    stages = {
        "prune": {"kind": "prune", "final_sparsity": 0.5, "alpha": 0.0},
        "spiral": {"kind": "spiral", "rounds": 3, "prune": {"alpha": 0.0}, **spiral},
    }
    pipeline = {"order": order, "stages": stages}
    if key is None:
        build_stages(pipeline)
        return
    with pytest.raises(ConfigError, match="stay frozen") as err:
        build_stages(pipeline)
    assert err.value.key == key, str(err.value)


def test_an_objective_on_a_figure_the_final_record_lacks_is_the_worst_value_said_in_the_log(caplog):
    """An ONNX Runtime figure is missing from the final record when the export failed: the trial returns the
    worst values (a KeyError ended the multirun), and final.objective is left out with an error."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from dpq.run.runner import Runner
    from dpq.train import objective_values

    cfg = OmegaConf.create({"objective": {"metrics": ["val_accuracy", "onnx_latency_ms_median"]}})
    final = {"val_accuracy": 0.8, "effective_gflops": 0.5}
    with caplog.at_level("ERROR"):
        got = objective_values(cfg, {"final": final}, OmegaConf.create(["maximize", "minimize"]))
    assert got == [float("-inf"), float("inf")] and "the ONNX export failed" in caplog.text
    assert objective_values(cfg, {"final": {**final, "onnx_latency_ms_median": 2.0}}) == [0.8, 2.0]
    runner = SimpleNamespace(ctx=SimpleNamespace(cfg={"objective": {"weights": {"val_accuracy": 1.0}}}))
    Runner._objective(runner, final)
    assert final["objective"] == 0.8
    runner.ctx.cfg["objective"]["weights"]["onnx_size_bytes"] = -1e-8
    del final["objective"]
    caplog.clear()
    with caplog.at_level("ERROR"):
        Runner._objective(runner, final)
    assert "objective" not in final and "final.objective not computed" in caplog.text


def test_feature_settings_with_every_feature_weight_zero_are_warned_about(caplog):
    """A layer_map (or hidden_kind) set while hidden, attention and relation are all 0 was accepted and
    ignored: plain logit KD ran. A spiral's rounds are looked at as they will run."""
    from dpq.run.validate import warn_unused_feature_settings
    from dpq.stages import build_stages

    pipeline = {
        "order": ["teacher", "distill", "prune"],
        "stages": {
            "teacher": {"kind": "teacher"},
            "distill": {"kind": "distill", "layer_map": [1, 5], "hidden_kind": "cosine"},
            "prune": {"kind": "prune", "layer_map": [1, 2], "hidden": 1.0},  # used: not said
        },
    }
    said = warn_unused_feature_settings(build_stages(pipeline))
    assert said == [
        "pipeline.stages.distill.layer_map=[1, 5], pipeline.stages.distill.hidden_kind=cosine has no effect: "
        "pipeline.stages.distill.hidden, .attention and .relation are all 0 (logit KD only)"
    ]
    spiral = {
        "order": ["teacher", "spiral"],
        "stages": {
            "teacher": {"kind": "teacher"},
            "spiral": {"kind": "spiral", "distill": {"layer_map": [2, 2]}},
        },
    }
    assert [m.split(" has")[0] for m in warn_unused_feature_settings(build_stages(spiral))] == [
        "pipeline.stages.spiral.distill.layer_map=[2, 2]"
    ]
