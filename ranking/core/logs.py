"""Log lines a cluster log can keep: Python's logging with the time and the rank in the prefix, and progress that is
a tqdm bar on a terminal and one plain line every few steps elsewhere (Slurm, nohup, CI, a pipe).

    [12:03:07 rank 0] ranking.train: step 40/500  loss 0.1234  active 0.42  lr 1.00e-03  images/s 212  ETA 0:03:05
"""

from __future__ import annotations

import datetime
import logging
import sys
import time

from tqdm import tqdm

_HANDLER_NAME = "ranking"


def setup_logging(rank: int) -> None:
    """Send the ``ranking.*`` loggers' INFO lines to stderr, prefixed with the time and ``rank``; idempotent (an
    in-process launcher may call a stage twice)."""
    logger = logging.getLogger("ranking")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank {rank}] %(name)s: %(severity)s%(message)s", "%H:%M:%S"))
    if not any(isinstance(f, _Severity) for f in handler.filters):
        handler.addFilter(_Severity())


class _Severity(logging.Filter):
    """``warning: `` (or ``error: ``) before a line that is more than information, as the CLI's own lines say it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.severity = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return True


def is_terminal() -> bool:
    return sys.stderr.isatty()


def eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class Progress:
    """Steps of a run: a tqdm bar when ``bar`` and stderr is a terminal, else plain lines through ``logger`` (only
    where ``shown``: rank 0). ``log(step, values)`` is called at the logged steps."""

    def __init__(self, logger: logging.Logger, total: int, initial: int, shown: bool, bar: bool) -> None:
        self.logger, self.total, self.shown = logger, total, shown
        self.start_step, self.started = initial, time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True) if shown and bar and is_terminal() else None

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, loss: float, active_fraction: float, lr: float, images_per_s: float) -> None:
        if not self.shown:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", images_per_s=f"{images_per_s:.0f}")
            return
        done = step - self.start_step
        left = (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else 0.0
        self.logger.info(
            f"step {step}/{self.total}  loss {loss:.4f}  active {active_fraction:.2f}  lr {lr:.2e}  "
            f"images/s {images_per_s:.0f}  ETA {eta(left)}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
