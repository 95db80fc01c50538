"""Where code lives: stages never import stages, libraries never import stages, and every choice family has one
registry that matches its Literal type in the config."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from ranking import config, losses, miners, models, optim, retrieval, sampling

PACKAGE = Path(__file__).resolve().parents[1] / "ranking"
# each a `ranking SUBCOMMAND`
STAGES = {"train", "evaluate", "search", "report", "compare", "shards", "synth", "demo", "index", "export"}


def ranking_imports(path: Path) -> set[str]:
    """The ranking modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("ranking.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ranking":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("ranking."):
                found.add(node.module.split(".")[1])
    return found


def test_the_stages_are_the_cli_subcommands():
    from ranking.cli import SUBCOMMANDS

    assert {module.removeprefix("ranking.") for module, _ in SUBCOMMANDS.values()} == STAGES


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.stem)
def test_no_module_imports_a_stage(path: Path):
    """A stage is run, never used: what two stages share lives in a library module (shardformat, runfolder,
    evalfolder, tracking, grids, plots, embed, ...)."""
    imported_stages = (ranking_imports(path) & STAGES) - {path.stem}
    assert not imported_stages, f"{path.name} imports the stage(s) {sorted(imported_stages)}"


def test_the_guard_sees_a_stage_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ranking import report\n    import ranking.train\n")
    assert ranking_imports(bad) & STAGES == {"report", "train"}


def test_evaluation_ranks_do_not_import_matplotlib_or_wandb():
    code = "import sys, ranking.evaluate, ranking.train; print(sorted({'matplotlib', 'wandb'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("registry,choice_type", [
    (models.TRUNKS, config.Backbone),
    (losses.LOSSES, config.LossName),
    (miners.MINERS, config.MinerName),
    (optim.OPTIMIZERS, config.OptimizerName),
    (optim.SCHEDULES, config.ScheduleName),
    (sampling.SAMPLERS, config.SamplerName),
    (retrieval.PER_QUERY, config.ValMetric),
], ids=["trunks", "losses", "miners", "optimizers", "schedules", "samplers", "validation metrics"])
def test_each_registry_matches_its_literal(registry, choice_type):
    assert set(registry) == set(typing.get_args(choice_type))
