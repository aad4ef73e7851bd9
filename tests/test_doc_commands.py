"""Every ``python -m dpq.train`` command that README.md, sweeps/README.md and BENCHMARKS.md print composes
and passes the up-front validation as written: a renamed option, a removed preset or a mistyped key in the
docs fails here, not in the hands of the user who copies it. The other tools' commands (``python -m
dpq.pareto``, ``dpq.export``, ``dpq.predictions``, ``dpq.stage_cache``, ``python bench/*.py``) are parsed by
their own argument parsers, placeholders standing for a path (nothing runs).

Commands with placeholders (``$B``, ``<dense-s42>``, ``[a | b]``, a one-letter value such as
``final_sparsity=F``) are not runnable as written and are skipped; ``seed=S`` stands for any seed. Hydra
multiruns (``-m a=1,2``) are checked one swept value at a time. Commands for a GPU are checked up to the
one error a CPU-only machine must give them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from dpq.core.errors import ConfigError
from dpq.run.overrides import variants  # one override list per swept value, as the CLI checks them
from dpq.run.validate import validate

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "sweeps/README.md", "BENCHMARKS.md")
APP = re.compile(r"(?:python -m dpq\.train|dpq-train)(?=\s|$)(.*)")
PLACEHOLDER = re.compile(r"[$<|()]|=[A-Z]$")
GPU_ONLY = "no CUDA GPU is visible"


def shell_lines(doc: str) -> list[str]:
    """The lines of ``doc``'s shell blocks, continuation lines joined, trailing comments dropped."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", (ROOT / doc).read_text(), re.S):
        lines += [
            re.split(r"\s#", line, maxsplit=1)[0].strip() for line in block.replace("\\\n", " ").splitlines()
        ]
    return lines


def doc_commands(doc: str) -> list[str]:
    """The argument strings of the app's commands in ``doc``'s shell blocks."""
    return [m.group(1).strip() for line in shell_lines(doc) if (m := APP.search(line))]


def runnable(args: str) -> list[str] | None:
    """The overrides of one documented command, or None if it holds placeholders."""
    tokens = [t.replace("seed=S", "seed=42") for t in shlex.split(args)]
    if any(PLACEHOLDER.search(t) for t in tokens):
        return None
    return [t for t in tokens if t not in ("-m", "--multirun")]


HELP = "conf/hydra/help/dpq.yaml"  # `python -m dpq.train --help` shows these commands


def help_commands() -> list[str]:
    import yaml

    header = yaml.safe_load((ROOT / HELP).read_text())["header"]
    lines = [re.split(r"\s#", line, maxsplit=1)[0].strip() for line in header.splitlines()]
    return [m.group(1).strip() for line in lines if line.startswith("python") and (m := APP.search(line))]


CASES = [(doc, args) for doc in DOCS for args in doc_commands(doc)] + [(HELP, a) for a in help_commands()]


def test_the_docs_show_commands_and_most_are_runnable_as_written():
    # the extraction itself must not rot into checking nothing
    for doc in DOCS:
        assert doc_commands(doc), f"no `python -m dpq.train` command found in {doc}"
    assert len(help_commands()) >= 5
    assert sum(runnable(a) is not None for _, a in CASES) >= 0.8 * len(CASES)


@pytest.mark.parametrize("doc,args", CASES, ids=[f"{d}:{a[:60]}" for d, a in CASES])
def test_a_documented_command_composes_and_validates(tmp_path, doc, args):
    overrides = runnable(args)
    if overrides is None:
        pytest.skip("placeholders")
    for i, variant in enumerate(variants(overrides)):
        try:
            cfg = OmegaConf.to_container(compose_cfg(tmp_path / str(i), variant), resolve=True)
        except Exception as e:  # Hydra: an unknown option or key
            raise AssertionError(f"{doc}: `python -m dpq.train {args}` does not compose: {e}") from e
        try:
            stages = validate(cfg)
        except ConfigError as e:
            if GPU_ONLY in str(e) and cfg["trainer"].get("accelerator") == "gpu":
                continue  # right on a CPU-only machine: the GPU command is refused before anything runs
            raise AssertionError(f"{doc}: `python -m dpq.train {args}` fails as written: {e}") from e
        assert [s.name for s in stages] == list(cfg["pipeline"]["order"])


def test_a_broken_documented_command_would_be_caught(tmp_path):
    with pytest.raises(ConfigError, match="final_sparsity"):
        cfg = compose_cfg(tmp_path, ["pipeline.stages.prune.final_sparsity=1.5"])
        validate(OmegaConf.to_container(cfg, resolve=True))
    assert runnable("experiment=deploy seed=S pipeline.stages.prune.final_sparsity=F") is None
    assert runnable("experiment=deploy seed=S") == ["experiment=deploy", "seed=42"]
    assert variants(["pipeline=dq,dpq", "seed=1"]) == [["pipeline=dq", "seed=1"], ["pipeline=dpq", "seed=1"]]


TOOL = re.compile(
    r"python (?:-m (dpq\.(?:pareto|export|predictions|stage_cache))|(bench/[a-z_]+\.py))(?=\s|$)(.*)"
)
MAINS = {
    "dpq.pareto": "dpq.pareto.cli",
    "dpq.export": "dpq.export.__main__",
    "dpq.predictions": "dpq.predictions",
    "dpq.stage_cache": "dpq.run.stage_cache",
}


def tool_commands(doc: str) -> list[tuple[str, str]]:
    """(module or script, argument string) of the other tools' commands in ``doc``'s shell blocks."""
    return [
        (m.group(1) or m.group(2), m.group(3).strip())
        for line in shell_lines(doc)
        for part in line.split(";")
        if (m := TOOL.search(part))
    ]


def as_argv(args: str) -> list[str]:
    """The arguments with placeholders as a path: ``$T``, ``$(ls ...)``, ``<run folder>``; ``[--opt]`` as
    ``--opt``; ``...`` dropped."""
    args = re.sub(r"\$\([^)]*\)", "RUN", args)
    args = re.sub(r"<[^>]*>", "RUN", args)
    args = re.sub(r"\[(--[^\]]*)\]", r"\1", args)
    return ["RUN" if t.startswith("$") else t for t in shlex.split(args) if t not in ("...", "…")]


def tool_main(tool: str):
    if tool in MAINS:
        return importlib.import_module(MAINS[tool]).main
    spec = importlib.util.spec_from_file_location(f"doc_{Path(tool).stem}", ROOT / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class Parsed(Exception):
    """Raised right after a tool's parser accepted its arguments, so that nothing runs."""


TOOL_CASES = [(doc, tool, args) for doc in DOCS for tool, args in tool_commands(doc)]


@pytest.mark.parametrize("doc,tool,args", TOOL_CASES, ids=[f"{d}:{t} {a[:50]}" for d, t, a in TOOL_CASES])
def test_a_documented_tool_command_parses(monkeypatch, capsys, doc, tool, args):
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        raise Parsed(real(self, *a, **k))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    main = tool_main(tool)
    try:
        main(as_argv(args))
    except Parsed:
        return
    except SystemExit as e:
        raise AssertionError(f"{doc}: `python {tool} {args}` is refused: {capsys.readouterr().err}") from e
    raise AssertionError(f"{tool}: its main() returned without parsing arguments")


def test_the_docs_show_the_tools_commands():
    tools = {t for _, t, _ in TOOL_CASES}
    assert {"dpq.pareto", "dpq.export", "dpq.predictions", "dpq.stage_cache", "bench/latency.py"} <= tools


def test_help_lists_dpqs_commands_and_the_options_of_every_group_a_user_can_choose(tmp_path):
    """``--help`` shows the commands checked above and each group's options as Hydra finds them (a user's
    ``--config-dir`` included), not the ``_base`` files other options build on."""
    import subprocess
    import sys

    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "tickets.yaml").write_text("defaults: [_base, _self_]\nname: tickets\n")
    out = subprocess.run(
        [sys.executable, "-m", "dpq.train", "--config-dir", str(tmp_path), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    groups = out.stdout.split("== Configuration groups (group=option) ==")[1].split("== Config")[0]
    assert "task: digits, fashion_mnist, rotten_tomatoes, sst2, tickets" in groups
    assert "pipeline: dense, dp, dpq," in groups and " _base" not in groups and "hydra" not in groups
    assert "python -m dpq.train experiment=tiny logger=csv" in out.stdout and "\ntask:\n" in out.stdout
