"""Where the stages write (issue 22, findings 9 and 13): an --out that is a folder, lies under a file, is on a
read-only or a full file system (a small tmpfs mounted here) is one line and leaves nothing half-written; `export`
replaces a file only with --overwrite, never a checkpoint's or an index's own file, and writes the format its
extension names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness import cli_refusal, fill, small_tmpfs, write_smoke_run
from ranking import export, index
from ranking.core.config import TrainConfig
from ranking.folders import runfolder
from ranking.synth import write_synthetic_archive


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("outputs")
    run = write_smoke_run(root / "run", str(root), image_size=32, embed_dim=16)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for n in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photos / f"p{n}.png")
    return {"root": root, "run": run, "photos": photos}


def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file"


# ---------------------------------------------------------------------------------------------------------------
# export


def test_export_out_a_folder_or_under_a_file_is_one_line(made, tmp_path, capsys):
    line = cli_refusal(capsys, "export", str(made["run"]), "--format", "safetensors", "--out", str(tmp_path))
    assert f"{tmp_path}: --out is a folder" in line
    file = under_a_file(tmp_path)
    line = cli_refusal(
        capsys, "export", str(made["run"]), "--format", "safetensors", "--out", str(file / "m.safetensors")
    )
    assert f"{file}: --out's folder exists and is not a folder" in line


def test_export_never_overwrites_without_asking_and_never_a_checkpoint(made, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"someone's file")
    line = cli_refusal(capsys, "export", str(made["run"]), "--format", "safetensors", "--out", str(out))
    assert f"{out}: --out exists; choose another name, or replace it with --overwrite" in line
    assert out.read_bytes() == b"someone's file"
    assert export.main([str(made["run"]), "--format", "safetensors", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"someone's file"

    state = made["run"] / "checkpoints" / "step-0000005" / "state.pt"
    before = state.read_bytes()
    for target in (state, made["run"] / "checkpoints" / "latest.pt"):
        line = cli_refusal(
            capsys, "export", str(made["run"]), "--format", "torchscript", "--out", str(target), "--overwrite"
        )
        assert "a checkpoint or index folder whose files other stages read and verify" in line
    assert state.read_bytes() == before


@pytest.mark.parametrize(
    "fmt,name", [("onnx", "m.safetensors"), ("torchscript", "m.onnx"), ("safetensors", "m.pt"), ("onnx", "model")]
)
def test_export_format_must_match_the_extension(fmt, name, made, tmp_path, capsys):
    line = cli_refusal(capsys, "export", str(made["run"]), "--format", fmt, "--out", str(tmp_path / name))
    assert f"--format {fmt} writes a" in line
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_read_only_or_full_file_system_is_one_line(made, tmp_path, capsys):
    with small_tmpfs(tmp_path / "ro", read_only=True) as ro:
        line = cli_refusal(
            capsys, "export", str(made["run"]), "--format", "safetensors", "--out", str(ro / "m.safetensors")
        )
        assert "is not writable" in line and "Read-only file system" in line
    with small_tmpfs(tmp_path / "full", full=True) as full:
        line = cli_refusal(
            capsys, "export", str(made["run"]), "--format", "safetensors", "--out", str(full / "m.safetensors")
        )
        assert f"{full / 'm.safetensors'}: cannot write (No space left on device)" in line
        assert sorted(p.name for p in full.iterdir()) == [".filler"]


# ---------------------------------------------------------------------------------------------------------------
# index


def test_index_out_under_a_file_read_only_or_full_is_one_line(made, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    flags = ["index", "--checkpoint", str(made["run"]), "--images", str(made["photos"]), "--out"]
    line = cli_refusal(capsys, *flags, str(under_a_file(tmp_path) / "index"))
    assert "a-file: --out's folder exists and is not a folder" in line
    with small_tmpfs(tmp_path / "ro", read_only=True) as ro:
        line = cli_refusal(capsys, *flags, str(ro / "index"))
        assert "Read-only file system" in line
    with small_tmpfs(tmp_path / "full", full=True) as full:
        line = cli_refusal(capsys, *flags, str(full / "index"))
        assert f"{full / 'index'}: cannot write the index (No space left on device)" in line
        assert sorted(p.name for p in full.iterdir()) == [".filler"]

    built = tmp_path / "built"
    assert index.main(flags[1:] + [str(built)]) == 0
    size_kib = sum(p.stat().st_size for p in built.iterdir()) // 1024 + 512
    with small_tmpfs(tmp_path / "small", size_kib=size_kib) as small:  # an --add that runs out of room
        grown = small / "grown"
        shutil.copytree(built, grown)
        fill(small)
        before = {p.name: p.read_bytes() for p in grown.iterdir()}
        line = cli_refusal(capsys, "index", "--add", str(made["photos"]), "--index", str(grown))
        assert "cannot write the index (No space left on device); it is left as it was" in line
        assert {p.name: p.read_bytes() for p in grown.iterdir()} == before
        assert sorted(p.name for p in small.iterdir()) == [".filler", "grown"]


# ---------------------------------------------------------------------------------------------------------------
# compare


def compare_run(root: Path, name: str) -> Path:
    run_dir = root / name
    runfolder.write_config(TrainConfig(run_dir=str(run_dir)), run_dir)
    for step, loss in enumerate([0.5, 0.4], 1):
        runfolder.append_metrics(run_dir, {"step": step, "loss": loss})
    return run_dir


def test_compare_out_a_folder_under_a_file_read_only_or_full_is_one_line(tmp_path, capsys):
    runs = [str(compare_run(tmp_path, name)) for name in ("a", "b")]
    line = cli_refusal(capsys, "compare", *runs, "--out", str(tmp_path))
    assert f"{tmp_path}: --out is a folder" in line
    line = cli_refusal(capsys, "compare", *runs, "--out", str(under_a_file(tmp_path) / "c.png"))
    assert "a-file: --out's folder exists and is not a folder" in line
    with small_tmpfs(tmp_path / "ro", read_only=True) as ro:
        line = cli_refusal(capsys, "compare", *runs, "--out", str(ro / "c.png"))
        assert "Read-only file system" in line
    with small_tmpfs(tmp_path / "full", full=True) as full:
        line = cli_refusal(capsys, "compare", *runs, "--out", str(full / "c.png"))
        assert f"{full / 'c.png'}: cannot write (No space left on device)" in line
        assert sorted(p.name for p in full.iterdir()) == [".filler"]


# ---------------------------------------------------------------------------------------------------------------
# finding 13: shards, synth, report


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.zip"
    write_synthetic_archive(path, classes=2, train_per_class=3, val_per_class=1, test_count=1, seed=0)
    return path


def test_shards_out_under_a_file_read_only_or_full_is_one_line(tiny_zip, tmp_path, capsys):
    flags = ["shards", str(tiny_zip), "--workers", "1", "--out"]
    line = cli_refusal(capsys, *flags, str(under_a_file(tmp_path) / "shards"))
    assert "a-file" in line
    with small_tmpfs(tmp_path / "ro", read_only=True) as ro:
        line = cli_refusal(capsys, *flags, str(ro / "shards"))
        assert "Read-only file system" in line
    with small_tmpfs(tmp_path / "full", size_kib=64, full=True) as full:
        line = cli_refusal(capsys, *flags, str(full / "shards"))
        assert f"{full / 'shards'}: cannot write shards (No space left on device)" in line
        assert sorted(p.name for p in full.iterdir()) == [".filler"]


@pytest.mark.system
def test_a_packing_worker_that_dies_is_one_line_not_a_hang(tiny_zip, tmp_path, capsys, monkeypatch):
    """multiprocessing.Pool waited forever for a dead worker's shard; the executor reports it. The workers are
    forked, so the patched write_shard is theirs: the worker packing the first train shard exits at once."""
    import os

    from ranking import shards

    write_shard = shards.write_shard

    def dies_on_the_first(plan, *args, **kwargs):
        if plan.name.startswith("train-000000"):
            os._exit(9)
        return write_shard(plan, *args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", dies_on_the_first)
    out = tmp_path / "shards"
    line = cli_refusal(
        capsys, "shards", str(tiny_zip), "--workers", "2", "--shard-size", "2", "--no-progress", "--out", str(out)
    )
    assert f"{out}: a packing worker died" in line
    assert not out.exists()


def test_synth_out_an_existing_folder_is_one_line(tmp_path, capsys):
    line = cli_refusal(capsys, "synth", "--out", str(tmp_path), "--classes", "2")
    assert f"{tmp_path}: --out is a folder" in line


def test_report_with_a_malformed_metrics_json_or_tampered_embeddings_is_one_line(tmp_path, capsys):
    run_dir = compare_run(tmp_path, "run")
    eval_dir = run_dir / "eval-0000002"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text('{"k": 30, "splits": ')
    line = cli_refusal(capsys, "report", str(run_dir), str(eval_dir), "--no-wandb")
    assert f"{eval_dir / 'metrics.json'}: not valid JSON" in line
    (eval_dir / "metrics.json").write_text(json.dumps({"k": 30, "step": 2, "splits": "tampered"}))
    line = cli_refusal(capsys, "report", str(run_dir), str(eval_dir), "--no-wandb")
    assert "metrics.json" in line
    (eval_dir / "metrics.json").write_text(json.dumps({"k": 30, "step": 2, "splits": {}, "pr_curve": {}}))
    torch.save({"gallery": "tampered"}, eval_dir / "embeddings.pt")
    line = cli_refusal(capsys, "report", str(run_dir), str(eval_dir), "--no-wandb")
    assert "embeddings.pt" in line


def test_nan_gallery_embeddings_of_an_evaluation_are_one_line_in_report_and_search(made, tmp_path, capsys):
    """Finding 14: an evaluation whose gallery holds NaN rows gave NaN distances and exit 0."""
    run_dir = compare_run(tmp_path, "run")
    eval_dir = run_dir / "eval-0000002"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({"k": 30, "step": 2, "splits": {}, "pr_curve": {}}))
    embeddings = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    embeddings[4] = float("nan")
    rows = {"embeddings": embeddings, "ids": torch.arange(10, 16), "labels": torch.tensor([0, 0, 1, 1, 2, 2])}
    torch.save(
        {"run_dir": str(run_dir), "step": 2, "shards": "", "gallery": rows, "query": rows}, eval_dir / "embeddings.pt"
    )
    expected = f"{eval_dir / 'embeddings.pt'}: 1 gallery embedding row(s) are not finite (NaN or inf), the first of "
    line = cli_refusal(capsys, "report", str(run_dir), str(eval_dir), "--no-wandb")
    assert expected + "sample id 14" in line
    query = next(made["photos"].iterdir())
    line = cli_refusal(capsys, "search", str(query), "--index", str(eval_dir), "--device", "cpu")
    assert expected + "sample id 14" in line
