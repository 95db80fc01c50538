"""Sharded embedding and `ranking evaluate` end to end: every id exactly once and the same metrics at 1 and 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from harness import REPO, SMOKE, free_port, launch
from ranking.retrieval.metrics import EmbeddingSet

# ---------------------------------------------------------------------------------------------------------------
# the gather: uneven shares, an empty rank, duplicates; 1, 2 and 3 real gloo ranks


def rank_share(rank: int, world_size: int) -> EmbeddingSet:
    """Rank r holds ids 0..22 with id % world_size == r, plus every id divisible by 5 again (duplicates);
    the last of 3 ranks holds nothing at all."""
    if world_size == 3 and rank == 2:
        ids = torch.zeros(0, dtype=torch.long)
    else:
        ids = torch.tensor([i for i in range(23) if i % world_size == rank or i % 5 == 0]).flip(0)
    return EmbeddingSet(torch.stack([ids.float(), -ids.float()], 1), ids, ids % 4)


def gather_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        ACCELERATE_USE_CPU="1",
    )
    from accelerate import Accelerator

    from ranking.retrieval.embed import gather_unique

    accelerator = Accelerator()
    assert accelerator.num_processes == world_size
    gathered = gather_unique(accelerator, rank_share(rank, world_size))
    # Plain lists: torch shares queued tensors through the sender's file descriptors, gone when it exits.
    results.put((rank, gathered.embeddings.tolist(), gathered.ids.tolist(), gathered.labels.tolist()))
    accelerator.end_training()


def test_gather_keeps_every_id_exactly_once_over_3_ranks():
    """Uneven shares, an empty rank and duplicates; 1 and 2 ranks gather real shards in the end-to-end test."""
    world_size = 3  # rank 2 holds nothing, the others hold ids 0..22 except those of rank 2 (and the duplicates)
    expected_ids = torch.tensor([i for i in range(23) if i % 3 != 2 or i % 5 == 0])
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(gather_worker, args=(world_size, free_port(), results), nprocs=world_size, start_method="spawn")
    by_rank = {rank: rest for rank, *rest in (results.get() for _ in range(world_size))}
    assert sorted(by_rank) == list(range(world_size))
    for embeddings, ids, labels in by_rank.values():  # every rank holds the whole, identical result
        assert ids == expected_ids.tolist()
        assert labels == (expected_ids % 4).tolist()
        assert embeddings == [[float(i), -float(i)] for i in ids]


# ---------------------------------------------------------------------------------------------------------------
# `ranking evaluate` end to end on the synthetic shards


@pytest.fixture(scope="module")
def tiny_run(synth_shards, tmp_path_factory) -> Path:
    """A run folder per the checkpoint contract, holding a randomly initialised small model."""
    from ranking.core import flags
    from ranking.core.config import TrainConfig
    from ranking.learning import models

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_cfg = flags.build(TrainConfig, str(SMOKE), {"shards": str(synth_shards), "run_dir": str(run), "wandb": False})
    flags.save(train_cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = models.build_model(train_cfg)
    step_dir = run / "checkpoints" / "step-0000007"
    step_dir.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 7}, step_dir / "state.pt")
    (run / "checkpoints" / "latest").symlink_to("step-0000007")
    return run


def run_evaluate(run: Path, shards: Path, out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    # one process: the stage's flag sets the precision; two: accelerate launch's flag does (the same rule as training)
    precision = ["--mixed-precision", "no"] if processes == 1 else []
    flags = [
        "--checkpoint",
        str(run),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--workers",
        "1",
        *precision,
        "--k",
        "5",
        "--chunk-size",
        "7",
        "--pr-points",
        "6",
        "--triplets",
        "300",
        *extra,
    ]
    if processes == 1:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "ranking", "evaluate", *flags]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    else:
        result = launch(flags, processes, timeout=300, module="ranking.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_evaluate_one_and_two_processes_agree(tiny_run, synth_shards, tmp_path):
    from ranking.folders.shardformat import load_manifest

    counts = {split: load_manifest(synth_shards)["splits"][split]["count"] for split in ("train", "val")}
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"eval-{processes}"
        result = run_evaluate(tiny_run, synth_shards, out, processes)
        assert f"{processes} process(es)" in result.stdout  # really that many ranks
        # progress as plain log lines: each rank's share of each split, then the metric phase
        for rank in range(processes):
            for split in ("train", "val"):
                share = len(range(rank, counts[split], processes))
                embedded = f" rank {rank}] ranking.retrieval.embed: {split}: embedded {share}/{share} images in "
                assert embedded in result.stderr
        assert " rank 0] ranking.evaluate: metrics: " in result.stderr and "\r" not in result.stderr
        source = "--mixed-precision" if processes == 1 else "Accelerate: accelerate launch's flag"
        assert f"mixed precision no ({source}" in result.stderr
        assert "| train |" in result.stdout and "| val |" in result.stdout
        assert sorted(p.name for p in out.iterdir()) == ["embeddings.pt", "metrics.json", "table.md"]

        stored = torch.load(out / "embeddings.pt", weights_only=True)
        assert stored["step"] == 7 and stored["gallery_split"] == "train" and stored["query_split"] == "val"
        for part, split in (("gallery", "train"), ("query", "val")):
            assert torch.equal(stored[part]["ids"], torch.arange(counts[split]))  # every id exactly once
            assert stored[part]["embeddings"].shape == (counts[split], 16)
        assert torch.allclose(stored["gallery"]["embeddings"].norm(dim=1), torch.ones(counts["train"]), atol=1e-5)

        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["k"] == 5 and metrics["step"] == 7
        assert metrics["splits"]["val"]["queries"] == counts["val"]
        assert metrics["splits"]["train"]["queries"] == counts["train"]
        assert len(metrics["pr_curve"]["val"]["recall"]) == 6
        table = (out / "table.md").read_text().splitlines()
        assert table[0].startswith("| split | precision@5 | kNN-1 | hit@5 | mAP | MAP@R | triplet accuracy |")
        assert [row.split("|")[1].strip() for row in table[2:]] == ["train", "val"]
        outputs[processes] = stored, metrics

    (one, metrics_one), (two, metrics_two) = outputs[1], outputs[2]
    for part in ("gallery", "query"):
        assert torch.equal(one[part]["labels"], two[part]["labels"])
        assert torch.allclose(one[part]["embeddings"], two[part]["embeddings"], atol=1e-5)
    for split in ("train", "val"):
        assert metrics_one["splits"][split] == pytest.approx(metrics_two["splits"][split], abs=1e-6)
        assert metrics_one["pr_curve"][split]["precision"] == pytest.approx(
            metrics_two["pr_curve"][split]["precision"], abs=1e-6
        )


def test_a_run_of_another_version_still_evaluates_with_one_warning_line(tiny_run, synth_shards, tmp_path):
    """Its config.yaml has a setting this version does not know and lacks one it has: `ranking evaluate` names both
    in one warning line and evaluates; the evaluation folder stores the model's identity it embedded with."""
    import shutil

    import yaml

    from ranking.learning.models import ModelSpec

    run = tmp_path / "old-run"
    shutil.copytree(tiny_run, run, symlinks=True)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["stored_size"]
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "old_flag": 3}, sort_keys=False))
    result = run_evaluate(run, synth_shards, tmp_path / "eval", 1)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line and "unverified" not in line]
    assert warnings == [
        f"warning: {run / 'config.yaml'}: written by another version of deep-ranking: ignoring "
        "old_flag (no such setting in this version); stored_size not in the file (taking today's "
        "defaults)"
    ], result.stderr
    spec = ModelSpec(
        backbone=saved["backbone"],
        embed_dim=saved["embed_dim"],
        dropout=saved["dropout"],
        normalize=saved["normalize"],
        image_size=saved["image_size"],
    ).to_dict()
    assert torch.load(tmp_path / "eval" / "embeddings.pt", weights_only=True)["model"] == spec
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["model"] == spec


def test_flip_embeds_an_image_and_its_mirror_alike_and_search_follows_the_index(
    tiny_run, synth_shards, tmp_path, capsys
):
    import io

    from PIL import Image, ImageOps

    from harness import shard_samples
    from ranking import search

    out = tmp_path / "eval-flip"
    run_evaluate(tiny_run, synth_shards, out, 1, "--flip")
    assert torch.load(out / "embeddings.pt", weights_only=True)["flip"] is True

    sample_id = 11
    mirrored = tmp_path / "mirrored.png"  # lossless: the mirror of the gallery image, pixel for pixel
    ImageOps.mirror(Image.open(io.BytesIO(shard_samples(synth_shards, "train")[sample_id][1]))).save(mirrored)
    plain = tmp_path / "eval-plain"
    run_evaluate(tiny_run, synth_shards, plain, 1)
    distances = {}
    for index, flip in ((out, True), (plain, False)):
        assert search.main([str(mirrored), "--index", str(index), "--top", "1"]) == 0
        rank, distance, *_ = capsys.readouterr().out.splitlines()[2].split()
        distances[flip] = float(distance)
    assert distances[True] < 1e-4  # an image and its mirror get one embedding: the original is found at 0
    assert distances[False] > 1e-3  # without --flip the random-init net tells them apart


def test_bad_checkpoint_is_a_ranking_error(tmp_path):
    from ranking.core.errors import RankingError
    from ranking.evaluate import main

    with pytest.raises(RankingError, match="nope: neither a checkpoint folder"):
        main(["--checkpoint", str(tmp_path / "nope")])
    with pytest.raises(RankingError, match="--checkpoint is required"):
        main([])


def test_missing_or_extra_ids_are_caught():
    from ranking.core.errors import RankingError
    from ranking.evaluate import check_complete

    def found(ids: list[int]) -> EmbeddingSet:
        return EmbeddingSet(torch.zeros(len(ids), 2), torch.tensor(ids), torch.zeros(len(ids), dtype=torch.long))

    check_complete(found([0, 1, 2]), 3, "shards/x", "val")
    with pytest.raises(RankingError, match="shards/x: the val shards hold 2 distinct ids, manifest.json says 3"):
        check_complete(found([0, 2]), 3, "shards/x", "val")
    with pytest.raises(RankingError, match="ids 0..2"):
        check_complete(found([0, 1, 3]), 3, "shards/x", "val")


def test_the_output_location_and_the_splits_are_checked_before_any_embedding(tiny_run, synth_shards, tmp_path):
    from ranking.core.errors import RankingError
    from ranking.evaluate import main

    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    with pytest.raises(RankingError, match="taken: --out exists and is not a folder"):
        main(["--checkpoint", str(tiny_run), "--shards", str(synth_shards), "--out", str(taken), "--workers", "0"])
    assert taken.read_text() == "a file, not a folder"
    with pytest.raises(RankingError, match="--query-split test: the test split is unlabelled"):
        main(["--checkpoint", str(tiny_run), "--query-split", "test"])


def test_with_wandb_disabled_the_evaluation_claims_no_wandb_log(tiny_run, synth_shards, tmp_path, monkeypatch):
    """A run that logs to W&B, evaluated under WANDB_MODE=disabled: one line says nothing was logged; no path of a
    W&B run that does not exist, and no W&B folder."""
    import shutil

    import yaml

    run = tmp_path / "logging-run"
    shutil.copytree(tiny_run, run, symlinks=True)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "wandb": True}, sort_keys=False))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    said = run_evaluate(run, synth_shards, tmp_path / "eval", 1).stdout
    assert "W&B is disabled: nothing logged to W&B" in said and "logged to W&B:" not in said, said
    assert not list(run.glob("wandb/*run-*"))


def test_without_gallery_metrics_only_the_queries_are_measured_and_alike():
    """--no-gallery-metrics (the quality benchmark's default) skips the gallery against itself; the queries'
    metrics are the same numbers."""
    from ranking.core.config import EvalConfig
    from ranking.evaluate import evaluate_splits

    torch.manual_seed(0)
    labels = torch.arange(40) % 4
    gallery = EmbeddingSet(torch.randn(40, 8) + 3 * torch.eye(8)[labels], torch.arange(40), labels)
    query = EmbeddingSet(torch.randn(12, 8) + 3 * torch.eye(8)[labels[:12]], torch.arange(100, 112), labels[:12])
    both = evaluate_splits(EvalConfig(k=5, triplets=0), gallery, query)
    queries_only = evaluate_splits(EvalConfig(k=5, triplets=0, gallery_metrics=False), gallery, query)
    assert sorted(both) == ["train", "val"] and list(queries_only) == ["val"]
    assert queries_only["val"].summary() == pytest.approx(both["val"].summary(), nan_ok=True)
