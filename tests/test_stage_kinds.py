"""A new stage kind is one module dropped into ``dpq.stages`` plus its YAML: nothing else changes.

The toy kind below is written to a temporary folder that joins the package's search path, as if
it were ``src/dpq/stages/scale_head.py``; the pipeline names it in YAML (here as overrides).
"""

import sys
import textwrap

import pytest
import torch

import dpq.stages
from dpq.core.errors import ConfigError
from dpq.stages.base import STAGES
from dpq.train import train

TOY = textwrap.dedent('''
    """``scale_head``: multiply the classifier head's weights by ``factor`` (a toy kind for the tests)."""

    from dataclasses import dataclass

    import torch

    from dpq.core.errors import ConfigError
    from dpq.stages.base import ModelCheck, Stage, register


    @dataclass
    class ScaleHeadConfig:
        kind: str = "scale_head"
        factor: float = 0.5

        def check(self, key: str) -> None:
            if not self.factor > 0:
                raise ConfigError(f"{key}.factor", self.factor, "must be > 0")


    @register
    class ScaleHeadStage(Stage):
        kind = "scale_head"
        Config = ScaleHeadConfig

        def check_model(self, check: ModelCheck) -> None:
            names = [n for n, _ in check.student.named_modules()] if check.student is not None else ["head"]
            if "head" not in names:
                raise ConfigError(self.key, self.name, "needs a model with a `head` module")

        def run(self, state, ctx) -> None:
            student = ctx.ensure_student(state)
            with torch.no_grad():
                student.head.weight.mul_(self.cfg.factor)
            ctx.record(state, self, student, extra={"factor": self.cfg.factor})
''')


@pytest.fixture
def toy_kind(tmp_path, monkeypatch):
    folder = tmp_path / "more_stages"
    folder.mkdir()
    (folder / "scale_head.py").write_text(TOY)
    monkeypatch.setattr(dpq.stages, "__path__", [*dpq.stages.__path__, str(folder)])
    yield
    STAGES.pop("scale_head", None)
    sys.modules.pop("dpq.stages.scale_head", None)


def overrides(*extra):
    return [
        "experiment=digits",
        "trainer=debug",
        "pipeline=dense",
        "cost.repeats=1",
        "cost.warmup=0",
        "+pipeline.stages.scale={kind: scale_head, factor: 0.25}",
        "pipeline.order=[teacher,distill,scale]",
        *extra,
    ]


def test_a_new_stage_kind_runs_from_its_module_and_yaml_alone(toy_kind, make_cfg, tmp_path):
    results = train(make_cfg(*overrides()))
    assert [s["stage"] for s in results["stages"]] == ["teacher", "distill", "scale"]
    scale = results["stages"][-1]
    assert scale["kind"] == "scale_head" and scale["factor"] == 0.25
    from dpq.run import snapshot

    snaps = tmp_path / "run" / "checkpoints"
    distilled = snapshot.read(snaps / "stage_1_distill")
    from dpq.models import load_model

    head0 = load_model({"arch": "mlp"}, {}, distilled.path(snapshot.STUDENT)).head.weight
    head1 = load_model({"arch": "mlp"}, {}, tmp_path / "run" / "model").head.weight
    torch.testing.assert_close(head1, head0 * 0.25)


def test_a_new_stage_kinds_config_is_checked_up_front_like_any_other(toy_kind, make_cfg):
    with pytest.raises(ConfigError) as e:
        train(make_cfg(*overrides("pipeline.stages.scale.factor=-1")))
    assert e.value.key == "pipeline.stages.scale.factor"
    with pytest.raises(ConfigError) as e:
        train(make_cfg(*overrides("+pipeline.stages.scale.speed=2")))
    assert e.value.key == "pipeline.stages.scale.speed" and "allowed: factor, kind" in str(e.value)


def test_every_shipped_kind_is_found_by_discovery():
    assert {"teacher", "distill", "prune", "recover", "spiral", "quantize", "ptq"} <= set(
        dpq.stages.discover()
    )


@pytest.mark.parametrize("preset", ["dpq", "spiral"])
def test_yaml_presets_say_what_the_stage_dataclasses_default_to(make_cfg, preset):
    """Defaults live in the dataclasses; a preset's stage entries must agree with them, so a stage added
    with ``+pipeline.stages.<name>={kind: ...}`` behaves as the preset's stage of that kind."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    stages = OmegaConf.to_container(make_cfg(f"pipeline={preset}").pipeline.stages, resolve=True)
    kinds = dpq.stages.discover()
    for name, raw in stages.items():
        cls = kinds[raw["kind"]]
        defaults = {
            f.name: (f.default_factory() if f.default_factory is not dataclasses_missing() else f.default)
            for f in fields(cls.Config)
        }
        differ = {k: (v, defaults[k]) for k, v in raw.items() if k != "kind" and defaults[k] != v}
        assert not differ, f"conf/pipeline: stage {name} ({raw['kind']}) says {differ} (yaml, dataclass)"


def dataclasses_missing():
    import dataclasses

    return dataclasses.MISSING
