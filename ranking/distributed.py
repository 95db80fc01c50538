"""Every rank query and collective of the project, and the stop signals of a cluster.

Every function also works without a process group (one process): gathers return their input, barriers return.
Accelerate sets the process group up; stages ask here, not ``torch.distributed``, who and how many they are.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ranking.errors import RankingError

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # Slurm's time-limit warning and preemption
T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_rank() -> int:
    """This process's rank, also in a DataLoader worker or before the process group exists (the launcher's RANK)."""
    return rank() if is_distributed() else int(os.environ.get("RANK", 0))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, rank order, without a gradient path.

    Every rank must pass the same shape (P x K batches always have P * K rows).
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """``all_gather`` whose local slot is ``tensor`` itself, so the gradient flows back into this rank's part.

    open_clip's trick: the other ranks' parts are constants here; each rank back-propagates through its own rows,
    and DDP's gradient all-reduce adds the contributions up.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP syncs them only at the start of a
    forward pass, so after one each rank holds statistics updated by its own batch."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def broadcast_from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object; a collective)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_main(check: Callable[[], T]) -> T:
    """Rank 0 runs ``check`` and every rank gets its result (a collective); when ``check`` raises a RankingError,
    every rank raises it with rank 0's message, marked so that only rank 0 prints it."""
    outcome: tuple[T | None, str] = (None, "")
    if rank() == 0:
        try:
            outcome = (check(), "")
        except RankingError as e:
            outcome = (None, str(e) or type(e).__name__)
    result, error = broadcast_from_main(outcome)
    if error:
        raise RankingError(error).everywhere()
    return result  # type: ignore[return-value]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: all ranks must call it)."""
    if not is_distributed():
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def shutdown() -> None:
    """Destroy the process group; torchrun reports an error at exit when it is left alive."""
    if is_distributed():
        dist.destroy_process_group()


class StopRequest:
    """Set by SIGUSR1 or SIGTERM; the trainer finishes its step, checkpoints and exits with EX_TEMPFAIL.

    A context manager: the previous handlers come back on exit, so an in-process launcher (submitit) keeps its own.
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, signal._HANDLER] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum)

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
