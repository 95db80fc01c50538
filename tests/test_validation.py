"""Validation during training (ranking.retrieval.validation): the trainer's val metrics, computed on 2 gloo ranks,
equal a standalone `ranking evaluate` of the same checkpoint on the same gallery; checkpoints/best points at the best
step and survives rotation; W&B gets the val metrics at the training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import (
    launch,
    metrics,
    train_flags,
    wait_for,
    wandb_history_and_config,
    wandb_records,
    wandb_run,
    wandb_summary,
)
from ranking.folders import checkpoint, runfolder
from ranking.folders.shardformat import manifest_digest
from ranking.retrieval.evalfolder import read_metrics
from ranking.retrieval.validation import gallery_subset

PER_CLASS = 10


def wait_for_history(run_folder, seconds: float = 60) -> list[dict]:
    """The history of an offline run that this process logged: wandb's service writes its file asynchronously."""
    wait_for(lambda: wandb_history_and_config(run_folder)[0], seconds, f"the history of {run_folder.name}")
    return wandb_history_and_config(run_folder)[0]


def test_gallery_subset_is_per_class_fixed_by_seed(synth_shards, tmp_path):
    chosen = gallery_subset(str(synth_shards), PER_CLASS, seed=0, cache_dir=tmp_path)
    assert len(chosen) == 6 * PER_CLASS  # 6 classes of 40 train images: a gallery larger than k=30
    assert chosen == gallery_subset(str(synth_shards), PER_CLASS, seed=0)  # the cache changes nothing
    assert chosen != gallery_subset(str(synth_shards), PER_CLASS, seed=1)
    assert gallery_subset(str(synth_shards), 0, seed=0) is None  # 0: the whole split
    assert len(gallery_subset(str(synth_shards), 1000, seed=0)) == 240  # more than a class has: all of it


@pytest.mark.slow
def test_validation_during_training_equals_a_standalone_evaluation(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    flags = train_flags(
        synth_shards,
        run_dir,
        steps=6,
        lr=3e-3,
        **{
            "classes-per-batch": 3,
            "samples-per-class": 4,
            "eval-every": 2,
            "eval-gallery-per-class": PER_CLASS,
            "checkpoint-every": 100,
            "keep-checkpoints": 1,
            "wandb-artifacts": None,
        },
    )
    result = launch(flags)
    assert result.returncode == 0, result.stdout + result.stderr

    rows = [r for r in metrics(run_dir) if "val/precision@30" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(0 <= r["val/precision@30"] <= 1 and 0 <= r["val/knn1"] <= 1 and r["val/seconds"] > 0 for r in rows)

    best = max(rows, key=lambda r: (r["val/precision@30"], -r["step"]))  # the first of equal bests is kept
    best_dir = runfolder.checkpoints_dir(run_dir) / runfolder.BEST
    assert best_dir.resolve().name == runfolder.step_dir_name(best["step"])
    assert checkpoint.load_state(best_dir.resolve()).best_validation == pytest.approx(best["val/precision@30"])
    kept = sorted(p.name for p in runfolder.checkpoints_dir(run_dir).glob("step-*"))
    assert runfolder.step_dir_name(6) in kept and best_dir.resolve().name in kept  # keep 1, but best is kept too

    out = tmp_path / "eval"
    evaluated = subprocess.run(
        [
            sys.executable,
            "-m",
            "ranking",
            "evaluate",
            "--checkpoint",
            str(best_dir),
            "--out",
            str(out),
            "--gallery-per-class",
            str(PER_CLASS),
            "--workers",
            "0",
            "--mixed-precision",
            "no",
            "--triplets",
            "0",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    standalone = read_metrics(out)["splits"]["val"]
    assert standalone["precision_at_k"] == pytest.approx(best["val/precision@30"], abs=1e-6)
    assert standalone["knn1_accuracy"] == pytest.approx(best["val/knn1"], abs=1e-6)
    # an image's embedding can differ in its last bits between 2 ranks' batches and one process's (the CPU's
    # convolutions block by batch size), enough to swap two near-tied neighbours deep in a ranking: mAP, which
    # reads the whole ranking, sees such a swap (7.6e-5 on this machine); the top-30 counts above are exact
    assert standalone["map"] == pytest.approx(best["val/mAP"], abs=1e-3)

    training_run, eval_run = sorted((run_dir / "wandb").glob("offline-run-*"), key=lambda p: p.name)
    history, run_config = wandb_history_and_config(training_run)
    logged = {int(h["_step"]): h["val/precision@30"] for h in history if "val/precision@30" in h}
    assert logged == {r["step"]: pytest.approx(r["val/precision@30"]) for r in rows}
    # what the TrainConfig does not say, for comparing runs: 2 ranks x 3 classes x 4 images
    assert run_config["world_size"] == 2 and run_config["global_batch"] == 24
    assert run_config["shards_manifest_sha256"] == manifest_digest(synth_shards)
    assert all(h["train/step_s"] >= h["train/data_wait_s"] >= 0 for h in history if "train/loss" in h)

    # the run summary is the best validation, which a sweep on val/precision@30 maximises
    assert wandb_summary(training_run)["val/precision@30"] == pytest.approx(best["val/precision@30"])
    # one model artifact collection, weights only; `best` last moved to the best step, `latest` to the last
    artifacts = [r.artifact for r in wandb_records(training_run) if r.WhichOneof("record_type") == "artifact"]
    assert {(a.name, a.type) for a in artifacts} == {(f"model-{wandb_run(training_run).run_id}", "model")}
    by_step = {json.loads(a.metadata)["step"]: set(a.aliases) for a in artifacts}
    assert max(step for step, aliases in by_step.items() if "best" in aliases) == best["step"]
    assert "latest" in by_step[6]
    assert all(sorted(e.path for e in a.manifest.contents) == ["model.json", "model.safetensors"] for a in artifacts)

    # the standalone evaluation is a run of its own in the training run's group, at the training step it measured,
    # on the validation's names: one panel over trainer/step shows the curve and the evaluation's point
    eval_history = wait_for_history(eval_run)
    assert eval_history[0]["trainer/step"] == best["step"]
    assert eval_history[0]["val/precision@30"] == pytest.approx(standalone["precision_at_k"])
    assert eval_history[0]["eval/train/precision@30"] == pytest.approx(
        read_metrics(out)["splits"]["train"]["precision_at_k"]
    )
    assert any(k.startswith("eval/pr_curve") for k in eval_history[0])
    # --wandb-artifacts: W&B's staged copies (the embeddings, the tables) are in the run folder, not the home folder
    staging = run_dir / "wandb" / "artifacts" / "staging"
    # (W&B copies in the evaluation's own process, at add_file; this test's process logged W&B runs before, and
    # must not have passed a WANDB_DATA_DIR of its own on to the evaluation)
    assert (out / "embeddings.pt").stat().st_size in [p.stat().st_size for p in staging.iterdir()]
    eval_config = wandb_history_and_config(eval_run)[1]
    assert eval_config["mixed_precision"] == "no" and eval_config["checkpoint_step"] == best["step"]
    assert eval_config["checkpoint_sha256"] == checkpoint.state_sha256(best_dir.resolve())
    reported = subprocess.run(
        [sys.executable, "-m", "ranking", "report", str(run_dir), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
        timeout=300,
    )
    assert reported.returncode == 0, reported.stderr
    (report_run,) = set((run_dir / "wandb").glob("offline-run-*")) - {training_run, eval_run}
    groups = {run.job_type: run.run_group for run in map(wandb_run, (training_run, eval_run, report_run))}
    assert groups == {"train": "run", "eval": "run", "report": "run"}  # without --wandb-group: the run's name
    assert not os.path.exists(run_dir / "checkpoints" / ".best.tmp")
