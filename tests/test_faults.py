"""Issue 15, trainer side: a run is never lost and never hangs (real processes, real signals, real files).

Infeasible samplers and stalled streams, preemption with DataLoader workers, a launcher that dies, truncated shards,
divergence, damaged checkpoints and metrics logs, an index searched with another model, and a frozen peer rank.
The shard-side faults are in tests/test_faults_data.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from harness import (
    SMOKE,
    copy_shards,
    descendants,
    error_line,
    fault_flags,
    launch,
    logged,
    lying_class_counts,
    metrics,
    rank_steps,
    ranks_of,
    reap,
    train_one,
    wait_for,
)
from ranking import cli, search
from ranking.core import flags
from ranking.core.config import TrainConfig
from ranking.core.errors import ConfigError, RankingError
from ranking.data import stream
from ranking.data.loader import stream_seeds, train_batches
from ranking.folders import checkpoint, runfolder
from ranking.learning.models import build_model
from ranking.retrieval.evalfolder import EvalIndex
from ranking.retrieval.metrics import EmbeddingSet


def latest_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "latest" / "state.pt", weights_only=True)["step"]


# ------------------------------------------------------------------------ 6, 12: values torch alone would reject


@pytest.mark.parametrize(
    "override, message",
    [
        ({"lr": -0.1}, "lr must be greater than 0"),
        ({"lr": math.nan}, "lr must be a finite number"),
        ({"margin": -1.0}, "margin must be greater than 0"),
        ({"margin": math.inf}, "margin must be a finite number"),
        ({"dropout": 1.5}, "dropout must be less than 1"),
        ({"dropout": -0.1}, "dropout must be at least 0"),
        ({"weight_decay": -1e-4}, "weight_decay must be at least 0"),
        ({"grad_clip": -1.0}, "grad_clip must be at least 0"),
        ({"momentum": 1.0}, "momentum must be less than 1"),
        ({"workers": -1}, "workers must be at least 0"),
        ({"collective_timeout_s": 0.0}, "collective_timeout_s must be greater than 0"),
        ({"batch_timeout_s": -5.0}, "batch_timeout_s must be greater than 0"),
    ],
)
def test_out_of_range_training_values_are_refused_by_the_config(override, message):
    with pytest.raises(ConfigError) as error:
        flags.build(TrainConfig, str(SMOKE), override)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_infinite_margin_in_yaml_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "inf.yaml").write_text("margin: .inf\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(tmp_path / "inf.yaml"), "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "ranking train: error: margin must be a finite number; got inf\n"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ 2: batches that never come


@pytest.fixture(scope="module")
def one_image_per_class(tmp_path_factory) -> Path:
    """Shards whose every class has a single train image: neither sampler can ever pair a positive."""
    from ranking.shards import write_shards
    from ranking.synth import write_synthetic_archive

    root = tmp_path_factory.mktemp("singletons")
    write_synthetic_archive(root / "synth.zip", classes=4, train_per_class=1, val_per_class=1, test_count=2, seed=0)
    write_shards(root / "synth.zip", root / "shards", shard_size=50, workers=1, seed=0, progress=False)
    return root / "shards"


@pytest.mark.parametrize("case", ["too-many-per-class", "single-image-batch", "single-image-paper"])
def test_a_sampler_that_can_never_form_a_batch_is_refused_before_training(
    case, synth_shards, one_image_per_class, tmp_path
):
    """The trainer's input (loader.train_batches) refuses it before it makes a DataLoader; the CLI's line is below."""
    shards, extra = {
        "too-many-per-class": (synth_shards, {"samples_per_class": 41}),
        "single-image-batch": (one_image_per_class, {"classes_per_batch": 2, "samples_per_class": 2}),
        "single-image-paper": (one_image_per_class, {"sampler": "paper"}),
    }[case]
    cfg = flags.build(
        TrainConfig,
        str(SMOKE),
        {
            "shards": str(shards),
            "run_dir": str(tmp_path / "run"),
            "workers": 0,
            "classes_per_batch": 3,
            "samples_per_class": 4,
            **extra,
        },
    )
    with pytest.raises(RankingError) as error:
        train_batches(cfg, stream_seeds(cfg.seed, 0), pin_memory=False)
    assert str(error.value).startswith(f"{shards}: the {cfg.sampler} sampler needs "), error.value
    assert "\n" not in str(error.value)


@pytest.mark.timeout(60)
def test_an_infeasible_sampler_is_one_line_and_exit_2_before_a_step(synth_shards, tmp_path):
    started = time.monotonic()
    result = train_one(fault_flags(synth_shards, tmp_path / "run", steps=3, **{"samples-per-class": 41}), timeout=50)
    line = error_line(result)
    assert f"ranking.train: error: {synth_shards}: the batch sampler needs " in line, line
    assert time.monotonic() - started < 50
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.timeout(60)
def test_a_stalled_stream_ends_with_one_line_after_the_batch_timeout(synth_shards, tmp_path):
    shards = copy_shards(synth_shards, tmp_path / "shards")
    lying_class_counts(shards, 100)
    started = time.monotonic()
    result = train_one(
        fault_flags(shards, tmp_path / "run", steps=3, **{"samples-per-class": 50, "batch-timeout-s": 3}), timeout=50
    )
    line = error_line(result)
    assert f"error: {shards}: no batch for 3 s (--batch-timeout-s) at step 0" in line, line
    assert time.monotonic() - started < 45


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigterm_to_the_process_group_ends_a_stalled_run_promptly(synth_shards, tmp_path):
    """The stop handler used to set a flag that the blocked wait for a batch never read: now the wait is cut after a
    short grace, with exit 75; DataLoader workers (which ignore the signal) die with their rank."""
    shards = copy_shards(synth_shards, tmp_path / "shards")
    lying_class_counts(shards, 100)
    flags = fault_flags(
        shards, tmp_path / "run", steps=3, workers=1, progress=None, **{"samples-per-class": 50, "batch-timeout-s": 600}
    )
    flags.remove("--no-progress")
    run = train_one(flags, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: len(descendants(run.pid)) >= 1, 60, "the DataLoader worker started", run)
        children = descendants(run.pid)
        time.sleep(2)  # well into the wait for the first batch
        sent = time.monotonic()
        os.killpg(run.pid, signal.SIGTERM)  # the rank and its worker, as Slurm signals a job
        _, stderr = run.communicate(timeout=40)
        assert run.returncode == 75, stderr
        assert time.monotonic() - sent < 30
        assert "stopped at step 0/3 after waiting" in stderr and "(SIGTERM); no new checkpoint" in stderr, stderr
        wait_for(
            lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
            10,
            "the worker died with its rank",
        )
    finally:
        reap([psutil.Process(run.pid)] if run.poll() is None else [])
        reap([c for c in children if c.is_running()])


# ----------------------------------------------------------------------------- 5, 12: truncated and empty shards


def cut_at_sample_boundary(tar_path: Path, keep: int) -> None:
    """Rewrite the tar with only its first `keep` samples: a valid, shorter archive."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))[:keep]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            if member.name.split(".")[0] in keys:
                tar.addfile(member, io.BytesIO(data))


def test_a_shard_cut_at_a_sample_boundary_is_one_line_naming_it(synth_shards, tmp_path):
    shards = copy_shards(synth_shards, tmp_path / "shards")
    cut_at_sample_boundary(shards / "train-000002.tar", keep=30)
    cut_at_sample_boundary(shards / "val-000000.tar", keep=10)
    with pytest.raises(RankingError) as error:
        for _ in stream.train_records(str(shards), shuffle_buffer=0, seed=0):
            pass
    assert str(error.value).startswith(f"{shards / 'train-000002.tar'}: 30 samples, but manifest.json lists 50 ")
    with pytest.raises(RankingError, match=r"val-000000.tar: 10 samples, but manifest.json lists 50 "):
        list(stream.eval_samples(str(shards), "val", rank=0, world_size=1))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [0, 2])
def test_empty_train_shards_end_the_run_with_one_line_also_from_workers(synth_shards, tmp_path, workers):
    """Valid but empty tars used to stall forever with no message; a worker's error was dozens of lines."""
    shards = copy_shards(synth_shards, tmp_path / "shards")
    for path in shards.glob("train-*.tar"):
        tarfile.open(path, "w").close()
    lying_class_counts(shards, 40)  # past the feasibility check: the stream itself must notice
    result = train_one(fault_flags(shards, tmp_path / "run", steps=3, workers=workers), timeout=80)
    line = error_line(result)
    assert "samples, but manifest.json lists 50 (truncated or replaced since `ranking shards`" in line, line
    assert f"error: {shards}/train-00000" in line and ": 0 samples" in line, line


# ------------------------------------------------------------------------------------------- 6: divergence


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_diverging_run_stops_with_one_line_and_keeps_its_good_checkpoints(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = launch(
        fault_flags(synth_shards, run_dir, steps=20, lr=1e30, **{"checkpoint-every": 1, "keep-checkpoints": 5}),
        timeout=200,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "exitcode  : 2" in output, output
    errors = [line for line in output.splitlines() if line.startswith("ranking.train: error:") and "not finite" in line]
    assert len(errors) == 1, output  # both ranks agree on the same step; rank 0 says it, once
    assert f"traceback : {errors[0]}" in output  # and the launcher's summary names it as the root cause
    step = int(errors[0].split("not finite at step ")[1].split()[0])
    assert 2 <= step <= 5, errors
    # nothing from the diverged step on: no record, no checkpoint; what was saved before is still there
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, step))
    assert all(math.isfinite(r["train/loss"]) for r in metrics(run_dir))
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert saved == [f"step-{s:07d}" for s in range(1, step)], saved
    assert latest_step(run_dir) == step - 1


# ---------------------------------------------------------------------------------- 3, 4: signals and launchers


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preemption_of_every_process_with_workers_checkpoints_and_exits_75(synth_shards, tmp_path):
    """Slurm signals every process of a job: the DataLoader workers used to die first and crash their ranks."""
    run_dir = tmp_path / "run"
    flags = fault_flags(synth_shards, run_dir, steps=400, workers=2, **{"checkpoint-every": 1000})
    launcher = launch(flags, wait=False)
    processes: list[psutil.Process] = []
    try:
        wait_for(lambda: logged(run_dir), 180, "the first logged step", launcher)
        processes = [psutil.Process(launcher.pid), *descendants(launcher.pid)]
        assert sum("ranking.train" in " ".join(p.cmdline()) for p in processes) >= 2 + 2 * 2  # ranks and workers
        for process in processes:  # every process of the job, at once (also each session's group, as scancel)
            process.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
    finally:
        reap([p for p in processes if p.is_running()])
    # the launcher, signalled itself, reports no exit codes: the ranks' own line says they checkpointed
    assert "killed by signal" not in output and "exited unexpectedly" not in output, output
    stop_step = latest_step(run_dir)
    assert stop_step >= 1 and rank_steps(run_dir / "checkpoints" / "latest") == {0: stop_step, 1: stop_step}
    assert f"stopped at step {stop_step}/400 (SIGTERM); checkpoint " in output, output
    # W&B's service died of the signal too: the rank warned and went on (the tracebacks left are the launcher's
    # and W&B's at exit, none through the trainer)
    assert "exit 75 to be requeued" in output and "ranking/train.py" not in output, output
    assert "ranking/training/" not in output and "ranking/data/loader.py" not in output, output


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR1], ids=lambda s: s.name)
def test_ranks_checkpoint_and_exit_when_their_launcher_dies(synth_shards, tmp_path, sig):
    run_dir = tmp_path / "run"
    flags = fault_flags(synth_shards, run_dir, steps=400, **{"checkpoint-every": 1000})
    launcher = launch(flags, wait=False)
    ranks: list[psutil.Process] = []
    try:
        wait_for(lambda: logged(run_dir), 180, "the first logged step", launcher)
        ranks = ranks_of(launcher)
        assert len(ranks) == 2
        launcher.send_signal(sig)
        _, alive = psutil.wait_procs(ranks, timeout=60)
        assert not alive, f"ranks still running with parent {[p.ppid() for p in alive]}"
        output, _ = launcher.communicate(timeout=30)  # the ranks' output, through the pipe they inherited
    finally:
        reap([p for p in ranks if p.is_running()])
        if launcher.poll() is None:
            launcher.kill()
    stop_step = latest_step(run_dir)
    assert f"stopped at step {stop_step}/400 (SIGTERM); checkpoint " in output and "exit 75 to be requeued" in output
    assert rank_steps(run_dir / "checkpoints" / "latest") == {0: stop_step, 1: stop_step}
    assert max(r["step"] for r in metrics(run_dir)) == stop_step  # nothing written after the stop


# --------------------------------------------------------------------------------------- 14: a frozen peer rank


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_frozen_rank_ends_the_job_within_the_collective_timeout(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    timeout_s = 20
    flags = fault_flags(synth_shards, run_dir, steps=400, **{"collective-timeout-s": timeout_s})
    launcher = launch(flags, wait=False)
    ranks: list[psutil.Process] = []
    try:
        wait_for(lambda: logged(run_dir), 180, "the first logged step", launcher)
        ranks = ranks_of(launcher)
        frozen = next(p for p in ranks if p.environ()["RANK"] == "1")
        frozen.suspend()  # SIGSTOP
        stopped_at = time.monotonic()
        output, _ = launcher.communicate(timeout=timeout_s + 120)
        ended_in = time.monotonic() - stopped_at
    finally:
        reap([p for p in ranks if p.is_running()])
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    # rank 0's collective gives up after the timeout (torch's default waits 30 minutes); the launcher then ends
    # the frozen rank (SIGTERM, which a stopped process keeps pending, then SIGKILL)
    assert timeout_s - 2 < ended_in < timeout_s + 90, (ended_in, output)
    assert (
        f"error: rank 0: a collective waited more than {timeout_s} s (--collective-timeout-s) for another rank"
        in output
    ), output
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


# ---------------------------------------------------------------------- 10: damaged checkpoints, torn metrics


def small_state(step: int) -> checkpoint.TrainState:
    return checkpoint.TrainState(
        step=step,
        model={"w": torch.full((1000,), float(step))},
        optimizer={},
        scheduler={},
        wandb_run_id="abc",
        stream_seeds=(1, step),
    )


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoints_list_the_sha256_of_every_file(tmp_path):
    folder = checkpoint.save(tmp_path, small_state(10), keep=2)
    manifest = json.loads((folder / "checkpoint.json").read_text())
    assert manifest["step"] == 10 and set(manifest["files"]) == {"state.pt", "rng-rank0.pt"}
    checkpoint.verify(folder)
    flip_byte(folder / "rng-rank0.pt")
    with pytest.raises(RankingError, match=r"rng-rank0.pt: sha256 differs from checkpoint.json"):
        checkpoint.verify(folder)


def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, small_state(step), keep=3)
    root = tmp_path / "checkpoints"
    flip_byte(root / "step-0000030" / "state.pt")  # flipped bytes load silently: torch has no checksum
    (root / "step-0000020" / "rng-rank0.pt").unlink()
    found, skipped = checkpoint.resumable(tmp_path, "latest")
    assert found == root / "step-0000010"
    assert skipped[0].startswith("skipping checkpoint step-0000030: ") and "sha256 differs" in skipped[0]
    assert skipped[1].startswith("skipping checkpoint step-0000020: ") and "missing" in skipped[1]
    with pytest.raises(RankingError, match="sha256 differs"):  # a checkpoint named explicitly must be intact
        checkpoint.resumable(tmp_path, str(root / "step-0000030"))
    with pytest.raises(RankingError, match="sha256 differs"):  # evaluate and search load through load_weights
        checkpoint.load_weights(root / "step-0000030")
    flip_byte(root / "step-0000010" / "state.pt")
    with pytest.raises(RankingError, match="no intact checkpoint to resume from"):
        checkpoint.resumable(tmp_path, "latest")


def test_checkpoints_written_before_manifests_still_resume(tmp_path):
    folder = checkpoint.save(tmp_path, small_state(10), keep=2)
    (folder / "checkpoint.json").unlink()
    assert checkpoint.resumable(tmp_path, "latest") == (folder, [])


def test_a_torn_last_metrics_line_is_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    assert [r["step"] for r in runfolder.read_metrics_log(tmp_path)] == [1, 2, 3]
    runfolder.restart_metrics_log(tmp_path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert "skipping the torn last line 4" in capsys.readouterr().err
    path.write_text('{"step": 1, "lo\n' + json.dumps({"step": 2}) + "\n")  # torn in the middle: not a crash's trace
    with pytest.raises(RankingError, match="line 1 is not"):
        runfolder.read_metrics_log(tmp_path)
    with pytest.raises(RankingError, match="line 1 is not"):
        runfolder.restart_metrics_log(tmp_path, 2)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_trainer_resumes_past_a_damaged_checkpoint_and_a_torn_log(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    flags = fault_flags(synth_shards, run_dir, steps=4, **{"checkpoint-every": 2, "keep-checkpoints": 3})
    first = train_one(flags, timeout=100)
    assert first.returncode == 0, first.stderr
    flip_byte(run_dir / "checkpoints" / "step-0000004" / "state.pt")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')
    resumed = train_one(
        fault_flags(synth_shards, run_dir, steps=6, resume="latest", **{"checkpoint-every": 2, "keep-checkpoints": 3}),
        timeout=100,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "warning: skipping checkpoint step-0000004: " in resumed.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'step-0000002'} at step 2" in resumed.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- 11: an index and another model


def write_run(run_dir: Path, shards: Path, embed_dim: int, seed: int) -> Path:
    cfg = flags.build(
        TrainConfig,
        str(SMOKE),
        {"run_dir": str(run_dir), "shards": str(shards), "wandb": False, "embed_dim": embed_dim},
    )
    runfolder.write_config(cfg, run_dir)
    torch.manual_seed(seed)
    state = checkpoint.TrainState(step=5, model=build_model(cfg).state_dict(), optimizer={}, scheduler={})
    return checkpoint.save(run_dir, state, keep=1)


def write_index(eval_dir: Path, run_dir: Path, shards: Path, dim: int, model_sha256: str) -> None:
    rows = EmbeddingSet(
        torch.nn.functional.normalize(torch.randn(240, dim), dim=1), torch.arange(240), torch.arange(240) % 6
    )
    EvalIndex(
        run_dir=str(run_dir),
        step=5,
        shards=str(shards),
        gallery_split="train",
        query_split="val",
        normalized=True,
        flip=False,
        gallery=rows,
        query=rows,
        model_sha256=model_sha256,
        embed_dim=dim,
    ).save(eval_dir)


@pytest.fixture()
def query_image(tmp_path) -> Path:
    path = tmp_path / "query.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("other_dim", [16, 24], ids=["same-dim", "other-dim"])
def test_search_refuses_an_index_moved_into_another_run(synth_shards, tmp_path, query_image, other_dim):
    first = write_run(tmp_path / "a", synth_shards, 16, seed=0)
    write_run(tmp_path / "b", synth_shards, other_dim, seed=1)  # the same step, other weights
    write_index(tmp_path / "a" / "eval", tmp_path / "a", synth_shards, 16, checkpoint.state_sha256(first))
    assert search.main([str(query_image), "--index", str(tmp_path / "a" / "eval"), "--top", "2"]) == 0
    shutil.move(tmp_path / "a" / "eval", tmp_path / "b" / "eval")
    shutil.rmtree(tmp_path / "a")  # the recorded run is gone: search looks in the folder the index is in
    with pytest.raises(RankingError) as error:
        search.main([str(query_image), "--index", str(tmp_path / "b" / "eval")])
    assert "embedded by another model than" in str(error.value) and "\n" not in str(error.value)


def test_search_refuses_an_old_index_of_another_width_with_one_line(synth_shards, tmp_path, query_image):
    """Indexes written before the model was recorded still load; a width mismatch is one line, not a traceback."""
    write_run(tmp_path / "b", synth_shards, 24, seed=1)
    write_index(tmp_path / "b" / "eval", tmp_path / "gone", synth_shards, 16, "")
    stored = torch.load(tmp_path / "b" / "eval" / "embeddings.pt", weights_only=True)
    del stored["model_sha256"], stored["embed_dim"]
    torch.save(stored, tmp_path / "b" / "eval" / "embeddings.pt")
    assert EvalIndex.load(tmp_path / "b" / "eval").embed_dim == 16
    with pytest.raises(RankingError, match=r"holds 16-d embeddings, but the model .* embeds in 24 dimensions"):
        search.main([str(query_image), "--index", str(tmp_path / "b" / "eval")])
