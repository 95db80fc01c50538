"""`ranking compare`: two run folders side by side, from their real files (config.yaml, metrics.jsonl, an
evaluation's metrics.json)."""

from __future__ import annotations

import pytest
from PIL import Image

from ranking import cli
from ranking.compare import main
from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.folders import runfolder
from ranking.retrieval import evalfolder


def make_run(
    root, name: str, lr: float, losses: list[float], val: dict[int, float] | None = None, evaluated: float | None = None
):
    run_dir = root / name
    runfolder.write_config(TrainConfig(run_dir=str(run_dir), lr=lr, margin=0.2 if name != "wide" else 0.5), run_dir)
    for step, loss in enumerate(losses, 1):
        # "wide" is a run from before the train/ names: compare reads both
        record = (
            {"step": step, "loss": loss, "active_fraction": 0.5, "lr": lr}
            if name == "wide"
            else {"step": step, "train/loss": loss, "train/active_fraction": 0.5, "train/lr": lr}
        )
        if val and step in val:
            record["val/precision@30"] = val[step]
        runfolder.append_metrics(run_dir, record)
    if evaluated is not None:
        curve = {"recall": [0.0, 0.5, 1.0], "precision": [1.0, evaluated, 0.1]}
        metrics = {
            "k": 30,
            "step": len(losses),
            "splits": {"val": {"precision_at_k": evaluated, "knn1_accuracy": 0.9, "map": 0.4}},
            "pr_curve": {"val": curve},
        }
        evalfolder.write_metrics(evalfolder.default_dir(run_dir, len(losses)), metrics)
    return run_dir


def test_compare_lists_the_differing_keys_and_draws_the_curves(tmp_path, capsys):
    base = make_run(tmp_path, "base", 1e-3, [0.5, 0.4, 0.3, 0.25], val={2: 0.61, 4: 0.58}, evaluated=0.6)
    wide = make_run(tmp_path, "wide", 3e-4, [0.6, 0.5, 0.45], evaluated=0.55)
    out = tmp_path / "cmp.png"
    assert main([str(base), str(wide), "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:3] == ["run", "margin", "lr"]  # only what differs, in config order: not backbone, ...
    assert "backbone" not in header and "run_dir" not in header
    rows = {
        cells[0]: dict(zip(header, cells))
        for cells in ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:])
    }
    assert rows["base"]["final loss"] == "0.2500" and rows["wide"]["steps"] == "3"
    assert rows["wide"]["final loss"] == "0.4500"  # its `loss`, under today's name
    assert rows["base"]["best val/precision@30 (step)"] == "61.00 (2)"  # the best, not the last
    assert rows["wide"]["best val/precision@30 (step)"] == "-"
    assert rows["base"]["eval val precision@30"] == "60.00" and rows["wide"]["eval val mAP"] == "40.00"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1600, 480)


def test_compare_needs_run_folders(tmp_path, capsys):
    with pytest.raises(RankingError, match="nowhere: no such run folder"):
        main([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ranking compare: error: {tmp_path / 'empty' / 'config.yaml'}: missing: the run's config is needed to "
        "rebuild its model"
    ]
