"""Reports (plots, ranked grids, table, W&B offline files) and image search, on the synthetic shards.

The run and evaluation folders are written here, per DESIGN.md, so these tests do not depend on the trainer or the
evaluator: a metrics.jsonl, a config.yaml, a checkpoint, and embeddings.pt + metrics.json.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harness import SMOKE, shard_samples
from ranking import cli, report, search
from ranking.core import config, flags
from ranking.core.errors import RankingError
from ranking.folders import shardformat
from ranking.reporting import grids
from ranking.retrieval import evalfolder
from ranking.retrieval.metrics import METRICS

RUN_ID = "reporttest01"
STEP = 10


def structured_embeddings(labels: torch.Tensor, dim: int, noise: float, seed: int) -> torch.Tensor:
    """Unit vectors near one direction per class: mostly same-class neighbours, some from other classes."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.one_hot(labels, dim).float()
    return F.normalize(centres + noise * torch.randn(len(labels), dim, generator=generator), dim=1)


def split_set(samples: dict[int, tuple[int, bytes]], embeddings_of) -> dict:
    ids = torch.tensor(sorted(samples))
    labels = torch.tensor([samples[int(i)][0] for i in ids])
    return {"embeddings": embeddings_of(ids, labels), "ids": ids, "labels": labels}


def write_eval_dir(eval_dir: Path, run_dir: Path, shards: Path, gallery: dict, query: dict) -> Path:
    eval_dir.mkdir(parents=True)
    torch.save(
        {
            "run_dir": str(run_dir),
            "step": STEP,
            "shards": str(shards),
            "gallery_split": "train",
            "query_split": "val",
            "normalized": True,
            "gallery": gallery,
            "query": query,
        },
        eval_dir / "embeddings.pt",
    )
    rng = np.random.default_rng(0)
    splits = {
        s: {
            "precision_at_k": float(rng.random()),
            "knn1_accuracy": float(rng.random()),
            "hit_at_k": float(rng.random()),
            "map": float(rng.random()),
            "map_at_r": float(rng.random()),
            "triplet_accuracy": float(rng.random()),
            "queries": n,
        }
        for s, n in (("val", 60), ("train", 240))
    }
    recall = np.linspace(0, 1, 50).tolist()
    lowest = {"val": 0.2, "train": 0.5}
    pr_curve = {s: {"recall": recall, "precision": np.linspace(1, lowest[s], 50).tolist()} for s in splits}
    (eval_dir / "metrics.json").write_text(json.dumps({"k": 30, "step": STEP, "splits": splits, "pr_curve": pr_curve}))
    return eval_dir


def write_run_dir(run_dir: Path, train_config: config.TrainConfig, state: dict) -> Path:
    checkpoint = run_dir / "checkpoints" / f"step-{STEP:07d}"
    checkpoint.mkdir(parents=True)
    flags.save(train_config, run_dir / "config.yaml")
    torch.save({"step": STEP, "wandb_run_id": RUN_ID, **state}, checkpoint / "state.pt")
    os.symlink(checkpoint.name, run_dir / "checkpoints" / "latest")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, STEP + 1):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": 0.2 / step,
                        "active_fraction": 1 - step / 20,
                        "lr": 1e-3,
                        "triplets_per_s": 100.0,
                    }
                )
                + "\n"
            )
    return run_dir


# ---------------------------------------------------------------------------------------------------------------
# report


def write_report(root: Path, shards: Path, *flags: str) -> dict:
    """A run + evaluation folder with structured embeddings, and the report's output on them."""
    train, val = shard_samples(shards, "train"), shard_samples(shards, "val")
    gallery = split_set(train, lambda ids, labels: structured_embeddings(labels, 8, 0.6, seed=1))
    query = split_set(val, lambda ids, labels: structured_embeddings(labels, 8, 0.6, seed=2))
    run_dir = write_run_dir(root / "run", config.TrainConfig(run_dir=str(root / "run")), {})
    eval_dir = write_eval_dir(run_dir / "eval", run_dir, shards, gallery, query)
    output = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(output):
        assert report.main([str(run_dir), *flags]) == 0  # finds run/eval on its own
    return {
        "run": run_dir,
        "eval": eval_dir,
        "gallery": gallery,
        "query": query,
        "stdout": output.getvalue(),
        "eval_data": evalfolder.EvalIndex.load(eval_dir),
    }


@pytest.fixture(scope="module")
def reported(synth_shards, tmp_path_factory):
    """The report without W&B, whose service is a process of its own; the W&B test writes its own report."""
    return write_report(tmp_path_factory.mktemp("report"), synth_shards, "--no-wandb")


def open_png(path: Path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    assert image.format == "PNG"
    return image.convert("RGB")


def test_report_writes_valid_pngs_of_the_expected_size(reported):
    assert open_png(reported["run"] / "loss.png").size == (800, 600)
    assert open_png(reported["eval"] / "pr_curve.png").size == (600, 500)
    pictures = sorted(reported["eval"].glob("ranked_*.png"))
    assert [p.name for p in pictures] == [f"ranked_{i}.png" for i in range(5)]
    for path in pictures:
        grid = np.asarray(open_png(path))
        assert grid.shape[:2][::-1] == grids.grid_size(rows=2, columns=11)
        assert grid.std() > 20  # pictures, not a blank canvas
    leftovers = [p.name for p in reported["eval"].iterdir() if ".tmp" in p.name]
    assert leftovers == []
    for name in ("loss.png", "pr_curve.png", "ranked_0.png"):
        assert name in reported["stdout"]


def test_five_queries_of_five_classes_with_their_nearest_and_farthest(reported):
    ranked = report.ranked_queries(reported["eval_data"], count=5, k=10)
    assert len({r.label for r in ranked}) == 5
    query, gallery = reported["query"], reported["gallery"]
    g = gallery["embeddings"].numpy().astype(np.float64)
    for r in ranked:
        row = int((query["ids"] == r.query_id).nonzero())
        assert int(query["labels"][row]) == r.label
        distances = ((g - query["embeddings"][row].numpy()) ** 2).sum(1)
        order = np.argsort(distances, kind="stable")
        assert [i for i, _ in r.nearest] == gallery["ids"][order[:10]].tolist()
        assert {i for i, _ in r.farthest} == set(gallery["ids"][order[-10:]].tolist())
        assert max(d for _, d in r.nearest) <= min(d for _, d in r.farthest)
        np.testing.assert_allclose([d for _, d in r.farthest], np.sort(distances)[-10:], atol=1e-5)


def test_grid_borders_are_green_for_the_same_class_and_red_for_others(reported):
    ranked = report.ranked_queries(reported["eval_data"], count=5, k=10)
    label_of = dict(zip(reported["gallery"]["ids"].tolist(), reported["gallery"]["labels"].tolist()))
    colours = {"same": 0, "other": 0}
    for n, r in enumerate(ranked):
        grid = np.asarray(open_png(reported["eval"] / f"ranked_{n}.png")).astype(int)

        def border(row: int, column: int, grid: np.ndarray = grid) -> tuple[int, ...]:
            x, y = grids.cell_origin(row, column)
            return tuple(grid[y + grids.BORDER // 2, x + grids.CELL_WIDTH // 2])

        assert border(0, 0) == grids.QUERY
        for row, results in ((0, r.nearest), (1, r.farthest)):
            for column, (gallery_id, _) in enumerate(results, 1):
                same = label_of[gallery_id] == r.label
                assert border(row, column) == (grids.SAME_CLASS if same else grids.OTHER_CLASS)
                colours["same" if same else "other"] += 1
    assert colours["same"] > 0 and colours["other"] > 0


def test_the_table_has_the_numbers_of_metrics_json(reported):
    metrics = json.loads((reported["eval"] / "metrics.json").read_text())
    lines = [line for line in reported["stdout"].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["split", "precision@30", "kNN-1"]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert list(rows) == ["train", "val"]
    keys = [metric.name for metric in METRICS]
    for split, cells in rows.items():
        assert [float(c) for c in cells] == pytest.approx([100 * metrics["splits"][split][k] for k in keys], abs=0.006)


@pytest.mark.system  # wandb.init starts W&B's service process
def test_report_logs_images_and_tables_in_a_report_run_beside_the_training_run(synth_shards, tmp_path):
    from harness import wandb_history_and_config, wandb_records

    reported = write_report(tmp_path, synth_shards)
    assert not list((reported["run"] / "wandb").glob(f"offline-run-*-{RUN_ID}")), (
        "the training run is not reopened from another process (offline segments sync lossily)"
    )
    runs = list((reported["run"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = next(r.run for r in wandb_records(runs[0]) if r.WhichOneof("record_type") == "run")
    assert (run.job_type, run.run_group, run.display_name) == ("report", "run", f"run report step {STEP}")
    history, _ = wandb_history_and_config(runs[0])
    run_config = {item.key: json.loads(item.value_json) for item in run.config.update}  # wandb.init(config=...)
    assert run_config["train_run_id"] == RUN_ID and history[0]["trainer/step"] == STEP
    assert run_config["checkpoint_step"] == STEP and run_config["eval_dir"] == str(reported["eval"])
    assert f"logged to W&B: {runs[0] / 'files'}" in reported["stdout"]  # a folder that exists
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    media = runs[0] / "files" / "media"
    for key in ("loss_curve", "pr_curve", *(f"ranked_{i}" for i in range(5))):
        logged = list((media / "images" / "report").glob(f"{key}_*.png"))
        assert len(logged) == 1, key
        assert f"media/images/report/{logged[0].name}".encode() in records
    assert b"report/metrics" in records
    ranked = json.loads(next((media / "table" / "report").glob("ranked_results_*.table.json")).read_text())
    assert ranked["columns"][:6] == ["query id", "query file", "query class", "query", "end", "rank"]
    assert len(ranked["data"]) == 5 * 2 * 10  # 5 queries, their 10 nearest and 10 farthest
    nearest = [row for row in ranked["data"] if row[4] == "nearest"]
    assert [row[5] for row in nearest[:10]] == list(range(1, 11))
    assert all(isinstance(row[-1], bool) for row in ranked["data"])
    table = json.loads(next((media / "table" / "report").glob("metrics_*.table.json")).read_text())
    assert [row[0] for row in table["data"]] == ["train", "val"]


@pytest.mark.system  # a process of its own: W&B reads WANDB_MODE once per process
def test_with_wandb_disabled_the_report_claims_no_wandb_log(synth_shards, tmp_path):
    run_dir = write_report(tmp_path, synth_shards, "--no-wandb")["run"]
    reported = subprocess.run(
        [sys.executable, "-m", "ranking", "report", str(run_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
        timeout=300,
    )
    assert reported.returncode == 0, reported.stderr
    assert "W&B is disabled: nothing logged to W&B" in reported.stdout
    assert "logged to W&B:" not in reported.stdout and not list(run_dir.glob("wandb/*run-*"))


def test_report_names_a_missing_metrics_log(tmp_path):
    with pytest.raises(RankingError, match=r"metrics\.jsonl: not found"):
        report.main([str(tmp_path), "--no-wandb"])


def test_grid_pads_any_image_into_its_tile():
    tall = Image.new("L", (30, 200), 0)
    grid = np.asarray(grids.draw_grid([[grids.Tile(tall, ["a", "b"], grids.SAME_CLASS), None]], "t"))
    assert grid.shape[:2][::-1] == grids.grid_size(rows=1, columns=2)
    x, y = grids.cell_origin(0, 0)
    centre = grid[y + grids.BORDER + grids.TILE // 2, x + grids.BORDER + grids.TILE // 2]
    edge = grid[y + grids.BORDER + grids.TILE // 2, x + grids.BORDER + 2]
    assert tuple(centre) == (0, 0, 0) and tuple(edge) == grids.BACKGROUND  # letterboxed, not stretched


# ---------------------------------------------------------------------------------------------------------------
# search


@pytest.fixture(scope="module")
def index(synth_shards, tmp_path_factory):
    """A random-init tiny model in a checkpoint, and an evaluation folder of its gallery embeddings."""
    from ranking.data.augment import EvalResize
    from ranking.data.stream import eval_samples
    from ranking.learning.models import build_model, input_normalization

    root = tmp_path_factory.mktemp("search")
    train_config = flags.build(
        config.TrainConfig, str(SMOKE), {"run_dir": str(root / "run"), "shards": str(synth_shards), "wandb": False}
    )
    torch.manual_seed(0)
    model = build_model(train_config).eval()
    mean, std = input_normalization(train_config.backbone)

    def embed(split: str):
        images, labels, ids = zip(*eval_samples(str(synth_shards), split, rank=0, world_size=1))
        order = torch.tensor(ids).argsort()
        with torch.inference_mode():
            embeddings = F.normalize(model(EvalResize(32, mean, std)(torch.stack(images))).float(), dim=1)
        return {"embeddings": embeddings[order], "ids": torch.tensor(ids)[order], "labels": torch.tensor(labels)[order]}

    run_dir = write_run_dir(root / "run", train_config, {"model": model.state_dict()})
    eval_dir = write_eval_dir(run_dir / f"eval-{STEP:07d}", run_dir, synth_shards, embed("train"), embed("val"))
    return {"eval": eval_dir, "train": shard_samples(synth_shards, "train"), "shards": synth_shards}


def search_output(capsys, *argv: str) -> list[str]:
    assert search.main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


def test_a_gallery_image_finds_itself_first(index, tmp_path, capsys):
    sample_id = 17
    query = tmp_path / "query.jpg"
    query.write_bytes(index["train"][sample_id][1])
    lines = search_output(capsys, str(query), "--index", str(index["eval"]), "--top", "5")
    assert lines[0] == str(query)
    results = lines[2:7]
    assert len(results) == 5 and lines[7] == ""
    rank, distance, file, wnid, *words = results[0].split()
    info = shardformat.split_index(index["shards"], "train")[sample_id]
    assert (rank, file, wnid) == ("1", info.file, info.wnid) and " ".join(words) == info.words
    assert float(distance) < 1e-4
    distances = [float(line.split()[1]) for line in results]
    assert distances == sorted(distances) and distances[1] > 1e-4
    assert (index["eval"] / "train-index.json").is_file()  # the metadata scan is cached for the next search


def test_grayscale_and_odd_sized_images_work_and_draw_a_grid(index, tmp_path, capsys):
    colour = Image.open(io.BytesIO(index["train"][3][1]))
    gray = tmp_path / "gray.png"
    colour.convert("L").resize((97, 41)).save(gray)
    big = tmp_path / "big.jpg"
    colour.resize((300, 500)).save(big)
    grid = tmp_path / "grid.png"
    lines = search_output(capsys, str(gray), str(big), "--index", str(index["eval"]), "--top", "3", "--grid", str(grid))
    assert [line for line in lines if line.endswith((".png", ".jpg"))][:2] == [str(gray), str(big)]
    assert sum(1 for line in lines if line[:4].strip().isdigit()) == 6
    image = open_png(grid)
    assert image.size == grids.grid_size(rows=2, columns=4)


def test_a_text_file_is_one_line_error_and_exit_2(index, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["search", str(notes), "--index", str(index["eval"])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(notes) in err and "not an image" in err
    with pytest.raises(RankingError, match="missing.png: no such image file"):
        search.main([str(tmp_path / "missing.png"), "--index", str(index["eval"])])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--top", "-5"], "--top must be at least 1; got -5"),
        (["--top", "51"], "--top must be at most 50; got 51"),
        (["--queries", "0"], "--queries must be at least 1; got 0"),
    ],
)
def test_report_bounds_the_grids(flags, message, tmp_path):
    with pytest.raises(RankingError, match=message):
        report.main([str(tmp_path), *flags])


def test_report_of_a_run_without_wandb_never_imports_it(tmp_path, monkeypatch, capsys):
    """A --no-wandb run is reported where wandb is not installed: with every wandb module None in sys.modules, any
    `import wandb...` raises ImportError, also of a module an earlier test imported."""
    import sys

    for name in [name for name in sys.modules if name == "wandb" or name.startswith("wandb.")] or ["wandb"]:
        monkeypatch.setitem(sys.modules, name, None)
    run_dir = write_run_dir(tmp_path / "run", config.TrainConfig(wandb=False), {})
    with pytest.raises(SystemExit) as done:
        cli.main(["report", str(run_dir)])
    assert done.value.code == 0, capsys.readouterr().err
    assert f"wrote {run_dir / 'loss.png'}" in capsys.readouterr().out


def test_report_reads_every_input_before_it_writes_a_picture(tmp_path):
    run_dir = write_run_dir(tmp_path / "run", config.TrainConfig(wandb=False), {})
    eval_dir = run_dir / "eval-0000010"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({"k": 30, "step": STEP, "splits": {}, "pr_curve": {}}))
    with pytest.raises(RankingError, match="embeddings.pt"):  # the evaluation folder lacks its embeddings
        report.main([str(run_dir), str(eval_dir), "--no-wandb"])
    assert not (run_dir / "loss.png").exists() and sorted(p.name for p in eval_dir.iterdir()) == ["metrics.json"]


def test_search_refuses_a_folder_as_grid_before_embedding(index, tmp_path):
    image = tmp_path / "query.png"
    Image.new("RGB", (20, 20)).save(image)
    with pytest.raises(RankingError, match=f"{tmp_path}: --grid is a folder"):
        search.main([str(image), "--index", str(index["eval"]), "--grid", str(tmp_path)])
