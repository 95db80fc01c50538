"""Where code lives: libraries in layered folders, each importing only its own layer and lower ones (checked by
path); stages at the top of the package, never imported by anything; every choice family has one registry that
matches its Literal type in the config."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from ranking.core import config
from ranking.data import sampling
from ranking.learning import losses, miners, models, optim
from ranking.retrieval import backends, inference, metrics

PACKAGE = Path(__file__).resolve().parents[1] / "ranking"
# lowest first: a module may import its own layer and the ones before it (DESIGN.md, "Modules")
LAYERS = ("core", "folders", "learning", "data", "retrieval", "reporting", "training")
# each a `ranking SUBCOMMAND`: run, never imported
STAGES = {
    "train",
    "evaluate",
    "search",
    "report",
    "compare",
    "shards",
    "synth",
    "demo",
    "index",
    "export",
    "serve",
    "dedup",
}
ENTRY = {"__init__", "__main__", "cli"}  # the package, `python -m ranking` and the subcommand dispatcher


def module_name(path: Path, root: Path = PACKAGE) -> str:
    return ".".join(("ranking", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    """The ranking modules a file imports, at the top or inside functions, as dotted names (``from ranking.core
    import files`` -> ``ranking.core.files``; ``from ranking import cli`` -> ``ranking.cli``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("ranking.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ranking" or node.module.startswith("ranking."):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def layer_of(module: str) -> str | None:
    """``ranking.core.files`` -> "core"; a top-level module (a stage, cli) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def violations(path: Path, root: Path = PACKAGE) -> list[str]:
    """What ``path`` imports against the rule: a library importing a higher layer or a top-level module, or any
    module importing a stage."""
    own = layer_of(module_name(path, root))
    found = []
    for module in sorted(imported_modules(path)):
        parts = module.split(".")
        if len(parts) < 2 or not parts[1].isidentifier() or parts[1] in ("__version__",):
            continue
        if parts[1] in STAGES and module_name(path, root) != f"ranking.{parts[1]}":
            found.append(f"{module} is a stage")
        elif own is not None:
            theirs = layer_of(module)
            if theirs is None and parts[1] not in LAYERS:
                found.append(f"{module} is above every library layer")
            elif theirs is not None and LAYERS.index(theirs) > LAYERS.index(own):
                found.append(f"{module} is in the higher layer {theirs!r}")
    return found


def test_every_module_has_a_place():
    """A library module sits in a layer folder; the top of the package holds only stages and the entry points."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            assert path.stem in STAGES | ENTRY, f"{path.name}: a library module at the top; move it into a layer"
        else:
            assert parts[0] in LAYERS and len(parts) == 2, f"{path}: not in one of the layers {LAYERS}"


def missing_modules(path: Path) -> list[str]:
    """The ``ranking`` modules a file imports that do not exist (an import a move forgot)."""
    missing = []
    for module in sorted(imported_modules(path)):
        parts = module.split(".")
        if parts[1] in LAYERS:
            if len(parts) > 2 and not (PACKAGE / parts[1] / f"{parts[2]}.py").is_file():
                missing.append(module)
        elif parts[1] not in STAGES | ENTRY | {"__version__"}:
            missing.append(module)
    return missing


@pytest.mark.parametrize(
    "path",
    sorted(p for folder in ("ranking", "jobs", "tests", "bench") for p in (PACKAGE.parent / folder).rglob("*.py")),
    ids=lambda p: str(p.relative_to(PACKAGE.parent)),
)
def test_every_import_of_ranking_names_a_module_that_exists(path: Path):
    assert not missing_modules(path), f"{path}: imports {missing_modules(path)}"


def test_the_stages_are_the_cli_subcommands():
    from ranking.cli import SUBCOMMANDS

    assert {module.removeprefix("ranking.") for module, _ in SUBCOMMANDS.values()} == STAGES


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_its_layer_and_lower(path: Path):
    assert not violations(path), f"{path.relative_to(PACKAGE)}: {'; '.join(violations(path))}"


@pytest.mark.parametrize(
    "planted,expected",
    [
        ("from ranking.retrieval import embed\n", "in the higher layer 'retrieval'"),
        ("def f():\n    import ranking.training.loop\n", "in the higher layer 'training'"),
        ("from ranking import train\n", "is a stage"),
        ("from ranking import cli\n", "above every library layer"),
    ],
)
def test_the_rule_refuses_a_planted_upward_import(tmp_path, planted, expected):
    """The same check on a copy of the package with one upward import planted in a learning module."""
    root = tmp_path / "ranking"
    (root / "learning").mkdir(parents=True)
    (root / "learning" / "losses.py").write_text("from ranking.core import distributed\n" + planted)
    found = violations(root / "learning" / "losses.py", root)
    assert len(found) == 1 and expected in found[0], found


def test_a_stage_may_use_libraries_but_not_another_stage(tmp_path):
    root = tmp_path / "ranking"
    root.mkdir()
    (root / "search.py").write_text(
        "from ranking import cli\nfrom ranking.retrieval import indexfolder\ndef f():\n    from ranking import report\n"
    )
    assert violations(root / "search.py", root) == ["ranking.report is a stage"]


def test_evaluation_ranks_do_not_import_matplotlib_or_wandb():
    code = "import sys, ranking.evaluate, ranking.train; print(sorted({'matplotlib', 'wandb'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "registry,choice_type",
    [
        (models.TRUNKS, config.Backbone),
        (losses.LOSSES, config.LossName),
        (miners.MINERS, config.MinerName),
        (optim.OPTIMIZERS, config.OptimizerName),
        (optim.SCHEDULES, config.ScheduleName),
        (sampling.SAMPLERS, config.SamplerName),
        (metrics.PER_QUERY, config.ValMetric),
        (inference.EXPORT_FORMATS, config.ExportFormat),
        (backends.BACKENDS, config.SearchBackendName),
    ],
    ids=[
        "trunks",
        "losses",
        "miners",
        "optimizers",
        "schedules",
        "samplers",
        "validation metrics",
        "export formats",
        "search backends",
    ],
)
def test_each_registry_matches_its_literal(registry, choice_type):
    assert set(registry) == set(typing.get_args(choice_type))
