"""`ranking compare RUN [RUN ...]`: runs side by side without W&B, for clusters without internet.

Prints the config keys whose values differ between the runs (the job's world size, processes per node, global
batch and scaled lr among them), and each run's final loss (``train/loss``), its best
validation metric during training (``val/...`` in metrics.jsonl, the names W&B shows) and its newest evaluation's val
metrics; draws the overlaid loss, validation and precision-recall curves into one PNG (``--out``, default
``compare.png``). Runs written before the ``train/`` names are read with today's names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ranking.core.errors import RankingError
from ranking.core.files import check_output_file
from ranking.core.flags import load_yaml, parse
from ranking.folders import runfolder
from ranking.reporting import plots
from ranking.retrieval import evalfolder, validation
from ranking.retrieval.metrics import titles

VAL_PREFIX = validation.VAL_PREFIX
LOSS = "train/loss"  # the names W&B shows; runfolder.read_metrics_log gives older runs' `loss` this name too


@dataclasses.dataclass
class RunSummary:
    name: str
    config: dict[str, Any]
    records: list[dict]
    evaluation: dict | None  # the newest evaluation's metrics.json

    def final(self, key: str) -> float | None:
        values = [r[key] for r in self.records if isinstance(r.get(key), (int, float))]
        return values[-1] if values else None

    def best(self, key: str) -> tuple[float, int] | None:
        """The highest value of ``key`` and its step."""
        points = [(r[key], r["step"]) for r in self.records if isinstance(r.get(key), (int, float))]
        return max(points) if points else None


def launch_of(run_dir: Path) -> dict[str, Any]:
    """The job's scale from config.yaml's ``launch`` block, under the names the table shows (``lr_scaled`` beside
    the recipe's ``lr``; ``mixed_precision`` already holds the precision that ran); empty for older runs."""
    try:
        launch = load_yaml(runfolder.config_path(run_dir)).get(runfolder.LAUNCH_KEY)
    except RankingError:
        return {}
    if not isinstance(launch, dict):
        return {}
    shown = {key: launch[key] for key in ("world_size", "processes_per_node", "global_batch") if key in launch}
    if "lr" in launch:
        shown["lr_scaled"] = launch["lr"]
    return shown


def read_run(run_dir: Path) -> RunSummary:
    if not run_dir.is_dir():
        raise RankingError(f"{run_dir}: no such run folder")
    config = {**dataclasses.asdict(runfolder.read_config(run_dir)), **launch_of(run_dir)}
    eval_dir = evalfolder.find_in_run(run_dir)
    evaluation = evalfolder.read_metrics(eval_dir) if eval_dir is not None else None
    return RunSummary(run_dir.name, config, runfolder.read_metrics_log(run_dir), evaluation)


def differing_keys(runs: list[RunSummary]) -> list[str]:
    """Config keys whose values are not the same in every run (the run folder always differs and is left out)."""
    keys = [key for key in runs[0].config if key != "run_dir"]
    return [key for key in keys if len({repr(run.config.get(key)) for run in runs}) > 1]


def validation_key(runs: list[RunSummary]) -> str | None:
    """The validation metric to compare: precision@k if any run logged it during training, else the first val key."""
    keys = sorted({key for run in runs for r in run.records for key in r if key.startswith(VAL_PREFIX)})
    return next((key for key in keys if key.startswith(f"{VAL_PREFIX}precision")), keys[0] if keys else None)


def comparison_table(runs: list[RunSummary], val_key: str | None) -> str:
    header = ["run", *differing_keys(runs), "steps", "final loss"]
    if val_key:
        header += [f"best {val_key} (step)"]
    k = next((run.evaluation.get("k", 30) for run in runs if run.evaluation), 30)
    shown = titles(k, ("precision_at_k", "knn1_accuracy", "map"))
    header += [f"eval val {title}" for title in shown.values()]
    rows = []
    for run in runs:
        loss = run.final(LOSS)
        row = [
            run.name,
            *(str(run.config.get(key)) for key in differing_keys(runs)),
            str(run.records[-1]["step"] if run.records else 0),
            "-" if loss is None else f"{loss:.4f}",
        ]
        if val_key:
            best = run.best(val_key)
            row.append("-" if best is None else f"{100 * best[0]:.2f} ({best[1]})")
        val = (run.evaluation or {}).get("splits", {}).get("val", {})
        row += [f"{100 * val[name]:.2f}" if isinstance(val.get(name), (int, float)) else "-" for name in shown]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


@dataclasses.dataclass
class CompareConfig:
    runs: list[str] = dataclasses.field(metadata={"positional": True, "metavar": "RUN"})  # run folders

    # output
    out: str = "compare.png"  # where to draw the overlaid curves


def main(argv: list[str] | None = None) -> int:
    config = parse(CompareConfig, argv, "ranking compare", __doc__.split("\n\n")[0], config_file=False)
    out = check_output_file(Path(config.out), "--out")  # before reading the runs
    run_dirs = [Path(run) for run in config.runs]
    runs = [read_run(run_dir) for run_dir in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # runs/a/lite0 and runs/b/lite0: name them by their whole path
        for run, run_dir in zip(runs, run_dirs):
            run.name = str(run_dir)
    val_key = validation_key(runs)
    print(comparison_table(runs, val_key))
    try:
        drawn = plots.plot_comparison({run.name: (run.records, run.evaluation) for run in runs}, out, val_key)
    except OSError as e:  # a full disk: the PNG is written atomically, so nothing half-written is left
        raise RankingError(f"{out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {drawn}")
    return 0
