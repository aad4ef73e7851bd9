"""The named experiments (conf/experiment/*.yaml): each composes into a valid run config, and the
deploy recipe, applied to tiny_bert, runs and exports what it promises (a shrunk model, 4-bit
encoder linears and word table in ONNX Runtime as MatMulNBits and GatherBlockQuantized)."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from dpq.pareto.gather import _flatten
from dpq.run.validate import validate
from dpq.train import train

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))
ONLINE = {"seed_study"}  # hub models: their skeletons need the network


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in ONLINE])
def test_every_experiment_composes_into_a_valid_config(make_cfg, name):
    cfg = OmegaConf.to_container(make_cfg(f"experiment={name}"), resolve=True)
    stages = validate(cfg)
    assert [s.name for s in stages] == list(cfg["pipeline"]["order"])


def test_the_deploy_recipe_on_tiny_bert_shrinks_quantizes_and_exports(make_cfg):
    recipe = yaml.safe_load((Path(__file__).parents[1] / "conf" / "experiment" / "deploy.yaml").read_text())
    cfg = make_cfg("experiment=tiny", "trainer=debug", "cost.repeats=2", "cost.warmup=1")
    cfg = OmegaConf.merge(cfg, {"pipeline": recipe["pipeline"]})  # deploy's stages on the tiny model
    # float activations: the weight-only MatMulNBits path (the recipe's default is tested below)
    cfg = OmegaConf.merge(
        cfg, {"pipeline": {"stages": {"quantize": {"act_bits": None, "act_range": "observed"}}}}
    )
    results = train(cfg)
    final, export = results["final"], results["onnx_export"]
    assert final["dense_gflops"] < 0.75 * results["stages"][1]["metrics"]["dense_gflops"]  # shrunk
    assert export["embedding"] == "GatherBlockQuantized 4-bit"
    assert len(export["nbits_layers"]) == 6 * 2 + 1 and not export["int8_layers"]  # 2 layers + pooler
    assert final["onnx_agreement"] == 1.0  # weight-only 4-bit: float math on exact weights, as trained
    assert final["onnx_size_bytes"] < 1.5 * final["size_bytes"]  # the file holds the low-bit codes


def test_the_deploy_recipe_with_dynamic_int8_activations_exports_the_model_it_trained(make_cfg):
    """act_bits=8 act_range=dynamic: QAT on uint8 activations over each input's range, exported as
    ONNX Runtime's integer kernels (no MatMulNBits), 4-bit codes stored as INT4: the exported model
    agrees with the PyTorch one it came from."""
    recipe = yaml.safe_load((Path(__file__).parents[1] / "conf" / "experiment" / "deploy.yaml").read_text())
    cfg = make_cfg("experiment=tiny", "trainer=debug", "cost.repeats=2", "cost.warmup=1")
    cfg = OmegaConf.merge(cfg, {"pipeline": recipe["pipeline"]})
    cfg = OmegaConf.merge(
        cfg, {"pipeline": {"stages": {"quantize": {"act_bits": 8, "act_range": "dynamic"}}}}
    )
    results = train(cfg)
    final, export = results["final"], results["onnx_export"]
    assert not export["nbits_layers"] and len(export["int8_layers"]) == 6 * 2 + 1
    assert export["ops"].get("QAttention") == 2 and export["ops"].get("Cast", 0) >= 2 * 3 + 1
    assert final["onnx_agreement"] == 1.0 and final["onnx_max_abs_logit_diff"] < 1e-4
    assert final["onnx_size_bytes"] < 1.5 * final["size_bytes"]


def test_the_deploy60_recipe_on_tiny_bert_exports_its_learned_steps_exactly(make_cfg):
    """experiment=deploy60 = deploy (LSQ steps) at 60% of heads and neurons: the learned step sizes
    become the exported int8 scales, so ONNX Runtime still computes the model QAT trained."""
    cfg = make_cfg(
        "experiment=deploy60",
        "teacher=tiny_bert",
        "model=tiny_bert",
        "trainer=debug",
        "task.subsample=256",
        "cost.repeats=2",
        "cost.warmup=1",
    )
    stages = cfg.pipeline.stages
    assert (stages.prune.final_sparsity, stages.quantize.observer, stages.quantize.act_range) == (
        0.6,
        "lsq",
        "dynamic",
    )  # deploy's steps
    results = train(cfg)
    final, export = results["final"], results["onnx_export"]
    dense = results["stages"][1]["metrics"]["dense_gflops"]
    assert final["dense_gflops"] < 0.6 * dense  # shrunk further than deploy's half
    assert not export["nbits_layers"] and len(export["int8_layers"]) == 6 * 2 + 1
    assert final["onnx_agreement"] == 1.0 and final["onnx_max_abs_logit_diff"] < 1e-4


def test_the_deploy70_preset_is_the_measured_recipe_deploy_at_70_percent_with_twice_the_recovery(make_cfg):
    """BENCHMARKS.md measured deploy70r8lsq as `experiment=deploy prune.final_sparsity=0.7
    recover.epochs=8` (LSQ steps): the preset must differ from deploy in exactly those two values,
    so a change to deploy (its quantizer, say) reaches deploy70 and nothing else sets it apart."""
    deploy, deploy70 = (
        _flatten(OmegaConf.to_container(make_cfg(f"experiment={n}"), resolve=True)["pipeline"])
        for n in ("deploy", "deploy70")
    )
    assert deploy.keys() == deploy70.keys()
    changed = {k: (deploy[k], deploy70[k]) for k in deploy if deploy[k] != deploy70[k]}
    assert changed == {"stages.prune.final_sparsity": (0.5, 0.7), "stages.recover.epochs": (4, 8)}
    assert deploy70["stages.quantize.observer"] == "lsq"


def test_the_deploy70mix_preset_is_the_command_its_runs_used_and_shares_their_cache_entries(make_cfg):
    """BENCHMARKS.md trained the mix as `experiment=deploy70 prune.final_sparsity=0.5` plus a CLI
    override of the FFN's fraction; the preset must resolve to that same config (the override's
    escaped regex key included), so its stage-cache keys are those runs' keys."""
    from dpq.run.stage_cache import pipeline_keys

    cli = OmegaConf.to_container(
        make_cfg(
            "experiment=deploy70",
            "pipeline.stages.prune.final_sparsity=0.5",
            r"+pipeline.stages.prune.overrides={re\:.*intermediate\.dense:0.81}",
        ),
        resolve=True,
    )
    preset = OmegaConf.to_container(make_cfg("experiment=deploy70mix"), resolve=True)
    assert preset["pipeline"]["stages"]["prune"]["overrides"] == {r"re:.*intermediate\.dense": 0.81}
    assert _flatten(preset["pipeline"]) == _flatten(cli["pipeline"])
    assert pipeline_keys(preset) == pipeline_keys(cli)
    deploy70 = _flatten(OmegaConf.to_container(make_cfg("experiment=deploy70"), resolve=True)["pipeline"])
    changed = {k for k, v in _flatten(preset["pipeline"]).items() if deploy70.get(k) != v}
    assert changed == {"stages.prune.final_sparsity", r"stages.prune.overrides.re:.*intermediate\.dense"}
