"""Why the training loop stops, the same answer on every rank, and what a stopped run says and exits with: done (0),
time limit (0, checkpointed), a stop signal or the file RUN/stop-request (75, checkpointed, to be requeued), a loss
or gradient norm that is not finite (2, no checkpoint), no batch within ``--batch-timeout-s`` (2, or 75 when a stop
signal cut the wait)."""

from __future__ import annotations

import enum
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ranking.core import distributed
from ranking.core.config import TrainConfig
from ranking.core.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REQUEUE, RankingError
from ranking.data.loader import BatchStall
from ranking.folders.runfolder import STOP_REQUEST
from ranking.training.checkpointing import latest_checkpoint


class Stop(enum.Enum):
    DONE = "done"
    TIME_LIMIT = "time limit"
    SIGNAL = "signal"
    DIVERGED = "diverged"  # a loss or gradient norm that is not finite, on any rank: no checkpoint, exit 2

    @property
    def exit_code(self) -> int:
        """A run stopped by a signal has more to do: exit 75 so that its launcher requeues it."""
        return EXIT_REQUEUE if self is Stop.SIGNAL else EXIT_BAD_INPUT if self is Stop.DIVERGED else EXIT_OK


class StopPolicy:
    """Why the loop stops after a step, the same answer on every rank (a collective: all ranks ask every step).

    ``clock`` (seconds, monotonic) measures the time limit; validation time is excluded from it.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        signals: distributed.StopRequest,
        device: torch.device,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.steps, self.minutes = cfg, cfg.steps, cfg.time_limit_minutes
        self.signals, self.device, self.clock = signals, device, clock
        self.deadline = clock() + 60 * cfg.time_limit_minutes
        self.request_file = Path(cfg.run_dir) / STOP_REQUEST
        self.file_requested = False
        self.next_look = clock()  # the request file is looked for at most once a second (a stat on a shared FS)

    def exclude(self, seconds: float) -> None:
        """The time limit counts training time: validation does not use it up."""
        self.deadline += seconds

    def reason(self, step: int, diverged: torch.Tensor) -> Stop | None:
        """``diverged``: this rank's flag (a 0-d bool tensor on the device) that a loss or gradient norm of the step
        was not finite. The three flags travel in one all-reduce, the collective this loop always made."""
        local = torch.tensor(
            [
                self.signals.requested or self.stop_requested_by_file(),
                self.minutes > 0 and self.clock() > self.deadline,
            ],
            device=self.device,
        )
        signalled, out_of_time, not_finite = distributed.any_rank_of(torch.cat([local, diverged.view(1)]))
        if not_finite:
            return Stop.DIVERGED
        if step >= self.steps:
            return Stop.DONE
        return Stop.SIGNAL if signalled else Stop.TIME_LIMIT if out_of_time else None

    def stop_requested_by_file(self) -> bool:
        """Whether RUN/stop-request exists (looked for at most once a second); once seen, it stays requested."""
        if not self.file_requested and self.clock() >= self.next_look:
            self.next_look = self.clock() + 1.0
            self.file_requested = self.request_file.exists()
        return self.file_requested

    def explain(self, stop: Stop, step: int, saved: Path) -> str:
        """The line a run that stopped early prints (rank 0), naming the checkpoint it saved; "" when done."""
        if stop is Stop.SIGNAL:
            why = (
                self.signals.signal.name
                if self.signals.signal
                else f"stop request {self.request_file}"
                if self.file_requested or self.request_file.exists()  # another rank may have looked first
                else "another rank's stop request"
            )
            return (
                f"ranking train: stopped at step {step}/{self.steps} ({why}); checkpoint {saved}; "
                f"exit {stop.exit_code} to be requeued"
            )
        if stop is Stop.TIME_LIMIT:
            return (
                f"ranking train: time limit of {self.minutes:g} min reached at step {step}/{self.steps}; "
                "checkpoint saved"
            )
        return ""

    def diverged(self, step: int) -> RankingError:
        """The error a diverged run ends with, on every rank (every rank saw the same flag): nothing of the step was
        logged or saved, so the good checkpoints are all still there."""
        run_dir = Path(self.cfg.run_dir)
        return RankingError(
            f"{run_dir}: the loss or gradient norm is not finite at step {step} (diverged: "
            "lower --lr, check --margin and the data); no checkpoint written, the last is "
            f"{latest_checkpoint(run_dir)}"
        ).everywhere()

    def stalled(self, step: int, stall: BatchStall) -> int:
        """No batch came: after a stop signal, exit 75 at once (no collective: the other ranks may be mid-step, and a
        checkpoint would need them); otherwise a one-line error naming the shards and the likely causes."""
        cfg = self.cfg
        where = f"at step {step}/{cfg.steps} after waiting {stall.waited_s:.0f} s for a batch"
        if self.signals.requested:
            assert self.signals.signal is not None
            print(
                f"ranking train: stopped {where} ({self.signals.signal.name}); no new checkpoint, the last is "
                f"{latest_checkpoint(Path(cfg.run_dir))}; exit {EXIT_REQUEUE} to be requeued",
                file=sys.stderr,
            )
            return EXIT_REQUEUE
        raise RankingError(
            f"{cfg.shards}: no batch for {cfg.batch_timeout_s:g} s (--batch-timeout-s) at step "
            f"{step}: the train stream stalled (a hung file system?) or the {cfg.sampler} sampler "
            "cannot form a batch from these shards"
        )
