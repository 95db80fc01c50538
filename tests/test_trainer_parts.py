"""The trainer's parts in one process: the stop policy on a fake clock, the batch watchdog on fake iterators (real
SIGALRM and SIGUSR1), one optimizer step and the checkpoint rule. Whole runs, launchers and peers are in
tests/test_train.py and tests/test_faults.py."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch._utils import ExceptionWrapper

from harness import SMOKE
from ranking.core import distributed, flags
from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.data.loader import BatchStall, BatchWatchdog, DeviceAugment, stream_seeds, train_batches
from ranking.data.sampling import Batch
from ranking.folders import checkpoint
from ranking.folders.shardformat import load_manifest
from ranking.learning.optim import lr_factor
from ranking.training.checkpointing import Checkpointer
from ranking.training.metrics import Meter
from ranking.training.parts import build_parts
from ranking.training.policies import Stop, StopPolicy
from ranking.training.step import train_step

CPU = torch.device("cpu")
NOT_DIVERGED, DIVERGED = torch.tensor(False), torch.tensor(True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy_of(signals: distributed.StopRequest, clock: FakeClock, **overrides) -> StopPolicy:
    cfg = TrainConfig(
        **{"steps": 10, "time_limit_minutes": 1.0, "run_dir": "runs/x", "shards": "shards/x", **overrides}
    )
    return StopPolicy(cfg, signals, CPU, clock=clock)


# ------------------------------------------------------------------------------------------------- stop policy


def test_the_time_limit_counts_training_time_only():
    clock = FakeClock()
    policy = policy_of(distributed.StopRequest(), clock)
    clock.now += 59
    assert policy.reason(3, NOT_DIVERGED) is None
    policy.exclude(30)  # a validation of 30 s
    clock.now += 30
    assert policy.reason(4, NOT_DIVERGED) is None  # 89 s on the clock, 59 s of training
    clock.now += 2
    assert policy.reason(5, NOT_DIVERGED) is Stop.TIME_LIMIT and Stop.TIME_LIMIT.exit_code == 0
    assert policy.explain(Stop.TIME_LIMIT, 5, Path("c")) == (
        "ranking train: time limit of 1 min reached at step 5/10; checkpoint saved"
    )
    unlimited = policy_of(distributed.StopRequest(), clock, time_limit_minutes=0.0)
    clock.now += 10**6
    assert unlimited.reason(5, NOT_DIVERGED) is None


def test_a_stop_signal_stops_after_the_step_and_asks_to_be_requeued():
    clock = FakeClock()
    with distributed.StopRequest() as signals:
        policy = policy_of(signals, clock)
        assert policy.reason(2, NOT_DIVERGED) is None
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in this (the main) thread before the next line
        assert signals.signal is signal.SIGUSR1
        assert policy.reason(3, NOT_DIVERGED) is Stop.SIGNAL and Stop.SIGNAL.exit_code == 75
        assert policy.explain(Stop.SIGNAL, 3, Path("run/checkpoints/step-0000003")) == (
            "ranking train: stopped at step 3/10 (SIGUSR1); checkpoint run/checkpoints/step-0000003; exit 75 to be "
            "requeued"
        )
    quiet = policy_of(distributed.StopRequest(), clock)  # this rank got no signal: another rank asked
    assert "(another rank's stop request)" in quiet.explain(Stop.SIGNAL, 3, Path("c"))


def test_a_stop_request_file_stops_like_a_signal_and_is_looked_for_once_a_second(tmp_path):
    """RUN/stop-request (slurm/common.sh writes it on USR1): where Slurm's signal never reaches the trainers."""
    clock = FakeClock()
    policy = policy_of(distributed.StopRequest(), clock, run_dir=str(tmp_path))
    assert policy.reason(2, NOT_DIVERGED) is None
    (tmp_path / "stop-request").write_text("USR1 to job 7\n")
    assert policy.reason(3, NOT_DIVERGED) is None  # looked for a moment ago: not again within the second
    clock.now += 1
    assert policy.reason(4, NOT_DIVERGED) is Stop.SIGNAL and Stop.SIGNAL.exit_code == 75
    assert policy.explain(Stop.SIGNAL, 4, Path("c")) == (
        f"ranking train: stopped at step 4/10 (stop request {tmp_path / 'stop-request'}); checkpoint c; exit 75 to "
        "be requeued"
    )


def test_the_last_step_is_done_whatever_else_and_divergence_beats_everything():
    clock = FakeClock()
    with distributed.StopRequest() as signals:
        policy = policy_of(signals, clock)
        os.kill(os.getpid(), signal.SIGTERM)
        clock.now += 3600
        assert policy.reason(10, NOT_DIVERGED) is Stop.DONE and Stop.DONE.exit_code == 0
        assert policy.explain(Stop.DONE, 10, Path("c")) == ""
        assert policy.reason(10, DIVERGED) is Stop.DIVERGED and Stop.DIVERGED.exit_code == 2
    assert policy_of(distributed.StopRequest(), FakeClock()).reason(1, DIVERGED) is Stop.DIVERGED


def test_a_diverged_run_names_its_last_good_checkpoint_on_every_rank(tmp_path):
    policy = policy_of(distributed.StopRequest(), FakeClock(), run_dir=str(tmp_path))
    error = policy.diverged(5)
    assert error.on_every_rank and str(error).endswith("no checkpoint written, the last is none")
    (tmp_path / "checkpoints" / "step-0000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").symlink_to("step-0000004")
    assert str(policy.diverged(5)) == (
        f"{tmp_path}: the loss or gradient norm is not finite at step 5 (diverged: lower --lr, check --margin and the "
        f"data); no checkpoint written, the last is {tmp_path / 'checkpoints' / 'step-0000004'}"
    )


def test_a_stalled_wait_is_one_line_or_a_requeue_after_a_signal(capsys):
    policy = policy_of(distributed.StopRequest(), FakeClock(), batch_timeout_s=30.0, sampler="batch")
    with pytest.raises(RankingError) as error:
        policy.stalled(4, BatchStall(30.2))
    assert str(error.value) == (
        "shards/x: no batch for 30 s (--batch-timeout-s) at step 4: the train stream stalled "
        "(a hung file system?) or the batch sampler cannot form a batch from these shards"
    )
    with distributed.StopRequest() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert policy_of(signals, FakeClock()).stalled(4, BatchStall(12.4)) == 75
    assert capsys.readouterr().err == (
        "ranking train: stopped at step 4/10 after waiting 12 s for a batch (SIGTERM); "
        "no new checkpoint, the last is none; exit 75 to be requeued\n"
    )


# -------------------------------------------------------------------------------------------- batch watchdog
# pytest-timeout's default method holds SIGALRM itself (and the watchdog then leaves it alone): use its thread method


class Stalled:
    """A stream that never gives a batch; ``signal_first``: a stop signal reaches the process once the wait began."""

    def __init__(self, signal_first: signal.Signals | None = None) -> None:
        self.signal_first = signal_first

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.signal_first is not None:
            os.kill(os.getpid(), self.signal_first)
        time.sleep(60)
        raise AssertionError("the watchdog did not cut the wait")


def waited(watchdog: BatchWatchdog) -> float:
    """The wait until BatchStall; the alarm and its handler are left as they were."""
    handler, started = signal.getsignal(signal.SIGALRM), time.monotonic()
    with pytest.raises(BatchStall) as stall:
        next(watchdog)
    assert abs(stall.value.waited_s - (time.monotonic() - started)) < 0.2
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0 and signal.getsignal(signal.SIGALRM) is handler
    return stall.value.waited_s


@pytest.mark.timeout(30, method="thread")
def test_a_batch_that_does_not_come_raises_batch_stall_at_the_timeout():
    with distributed.StopRequest() as signals:
        assert 0.5 <= waited(BatchWatchdog(Stalled(), 0.5, signals)) < 2
        batch = Batch(torch.zeros(1), torch.zeros(1), torch.zeros(1), None)
        assert next(BatchWatchdog(iter([batch]), 0.5, signals)) is batch


@pytest.mark.timeout(30, method="thread")
def test_a_stop_signal_shortens_the_wait_to_the_grace():
    with distributed.StopRequest() as signals:
        assert 0.5 <= waited(BatchWatchdog(Stalled(signal_first=signal.SIGTERM), 60, signals, grace_s=0.5)) < 3
        assert signals.signal is signal.SIGTERM
        # a signal that came before the wait: the next wait is the grace at most
        assert 0.5 <= waited(BatchWatchdog(Stalled(), 60, signals, grace_s=0.5)) < 3


def worker_failure(message: str) -> RankingError:
    """The error a DataLoader re-raises for a worker's RankingError, made by torch's own wrapper."""
    try:
        raise RankingError(message)
    except RankingError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except RankingError as e:
        return e
    raise AssertionError("not re-raised as a RankingError")


class Failing:
    def __init__(self, error: RankingError) -> None:
        self.error = error

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        raise self.error


@pytest.mark.timeout(30, method="thread")
def test_a_workers_ranking_error_comes_back_as_its_one_line():
    line = "shards/x/train-000001.tar: 0 samples, but manifest.json lists 50"
    from_worker = worker_failure(line)
    text = str(from_worker)
    assert text.startswith("Caught RankingError in DataLoader worker process 0") and len(text.splitlines()) > 2, text
    with distributed.StopRequest() as signals:
        with pytest.raises(RankingError) as error:
            next(BatchWatchdog(Failing(from_worker), 5, signals))
        assert str(error.value) == line
        with pytest.raises(RankingError) as error:  # raised in this process: unchanged
            next(BatchWatchdog(Failing(RankingError(line)), 5, signals))
        assert str(error.value) == line


# ------------------------------------------------------------------------------------ one step, the checkpoints


def smoke_config(shards: Path, run_dir: Path, **overrides) -> TrainConfig:
    return flags.build(
        TrainConfig,
        str(SMOKE),
        {
            "shards": str(shards),
            "run_dir": str(run_dir),
            "workers": 0,
            "shuffle_buffer": 50,
            "classes_per_batch": 3,
            "samples_per_class": 4,
            "wandb": False,
            "warmup_steps": 3,
            **overrides,
        },
    )


def test_one_step_accumulates_updates_once_and_flags_a_loss_that_is_not_finite(synth_shards, tmp_path):
    cfg = smoke_config(synth_shards, tmp_path / "run", grad_accum=2)
    accelerator = Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=cfg.grad_accum)
    parts = build_parts(cfg, accelerator)
    seeds = stream_seeds(cfg.seed, 0)
    batches, on_device = train_batches(cfg, seeds, pin_memory=False), DeviceAugment(cfg, seeds, 0, CPU)
    meter, before = Meter(CPU), {name: p.detach().clone() for name, p in parts.net.named_parameters()}

    done = train_step(cfg, accelerator, parts, batches, on_device, meter)
    assert not done.diverged and done.lr == pytest.approx(cfg.lr * lr_factor(0, cfg))
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(1, cfg))  # one schedule step
    assert meter.steps == pytest.approx(1.0) and meter.images == 2 * 12 and meter.triplets == 2 * 12
    assert any(not torch.equal(p, before[name]) for name, p in parts.net.named_parameters())

    with torch.no_grad():
        parts.net.head.weight.fill_(float("nan"))
    assert train_step(cfg, accelerator, parts, batches, on_device, meter).diverged


def test_checkpoints_every_n_on_a_new_best_and_at_a_stop_and_resume_into_the_parts(synth_shards, tmp_path):
    cfg = smoke_config(synth_shards, tmp_path / "run", checkpoint_every=3, keep_checkpoints=1)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    parts = build_parts(cfg, accelerator)
    saver = Checkpointer(cfg, accelerator, parts, validator=None)
    assert saver.resume(None) == 0 and saver.data_seeds == stream_seeds(cfg.seed, 0)
    assert [step for step in range(1, 8) if saver.due(step, None, best=False)] == [3, 6]
    assert saver.due(4, None, best=True) and saver.due(4, Stop.SIGNAL, best=False)

    with torch.no_grad():
        parts.net.head.weight.add_(1.0)  # trained weights, unlike a fresh build's
    saved = saver.save(4, best=True)
    assert saved == saver.last == tmp_path / "run" / "checkpoints" / "step-0000004"
    assert (tmp_path / "run" / "checkpoints" / "best").resolve() == saved
    assert checkpoint.load_state(saved).stream_seeds == stream_seeds(cfg.seed, 4)  # a resume reads new data

    fresh = build_parts(cfg, accelerator)
    resumed = Checkpointer(cfg, accelerator, fresh, validator=None)
    assert resumed.resume(saved) == 4 and resumed.data_seeds == stream_seeds(cfg.seed, 4)
    assert torch.equal(fresh.net.head.weight, parts.net.head.weight)

    wider = smoke_config(synth_shards, tmp_path / "run", embed_dim=24)
    with pytest.raises(RankingError, match=rf"^{re.escape(str(saved))}: weights do not fit the configured model \("):
        Checkpointer(wider, accelerator, build_parts(wider, accelerator), None).resume(saved)


def test_the_proxy_anchor_proxies_train_and_resume_with_the_run(synth_shards, tmp_path):
    cfg = smoke_config(synth_shards, tmp_path / "run", loss="proxy_anchor", sampler="batch")
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    parts = build_parts(cfg, accelerator)
    proxies = parts.objective.loss.proxies
    classes = len(load_manifest(synth_shards)["classes"])
    assert proxies.shape == (classes, cfg.embed_dim)
    assert parts.optimizer.param_groups[-1]["name"] == "proxies"
    seeds = stream_seeds(cfg.seed, 0)
    batches, on_device = train_batches(cfg, seeds, pin_memory=False), DeviceAugment(cfg, seeds, 0, CPU)
    before = proxies.detach().clone()
    train_step(cfg, accelerator, parts, batches, on_device, Meter(CPU))
    assert not torch.equal(proxies, before)  # the proxies learn in the optimizer's step
    saved = Checkpointer(cfg, accelerator, parts, validator=None).save(1, best=False)

    fresh = build_parts(cfg, accelerator)
    assert Checkpointer(cfg, accelerator, fresh, validator=None).resume(saved) == 1
    assert torch.equal(fresh.objective.loss.proxies, proxies)
    pairs = smoke_config(synth_shards, tmp_path / "pairs", loss="multi_similarity", sampler="batch")
    pair_parts = build_parts(pairs, accelerator)
    pair_checkpoint = Checkpointer(pairs, accelerator, pair_parts, validator=None).save(1, best=False)
    with pytest.raises(RankingError, match="the loss's parameters do not fit the configured loss"):
        Checkpointer(cfg, accelerator, build_parts(cfg, accelerator), None).resume(pair_checkpoint)
