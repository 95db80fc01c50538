"""Every rank query and collective of the project, and the stop signals of a cluster.

Every function also works without a process group (one process): gathers return their input, barriers return.
Accelerate sets the process group up; stages ask here, not ``torch.distributed``, who and how many they are.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

import torch
import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs
from torch import Tensor

from ranking.core.errors import EXIT_INTERRUPTED, RankingError

# Slurm's time-limit warning, preemption, and Ctrl-C (a stop request like the others; a second one exits at once)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
SAME_INTERRUPT_S = 2.0  # a SIGINT this soon after the first stop request is the same Ctrl-C, forwarded
LAUNCHER_PID = os.getppid()  # the parent when this module was first imported: torchrun's agent under a launch
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


def first_error(message: str) -> str:
    """The first rank's non-empty ``message`` on every rank, "" when no rank has one (a collective: all ranks call
    it, so that a failure of one rank's part, a checkpoint file on a full disk, ends every rank the same way)."""
    if not is_distributed():
        return message
    messages: list[str] = [""] * world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), "")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: all ranks must call it)."""
    if not is_distributed():
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def process_group_kwargs(timeout_s: float) -> InitProcessGroupKwargs:
    """Accelerator's process group settings: a collective that waits ``timeout_s`` on a frozen or lost peer raises
    instead of waiting torch's default 30 minutes (gloo on CPU; NCCL's watchdog on GPUs)."""
    return InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))


def timed_out(error: RuntimeError, timeout_s: float, advice: str = "resume from the last checkpoint") -> Exception:
    """A collective that gave up on a frozen or lost peer, as one line (gloo and NCCL raise a DistBackendError or a
    RuntimeError whose message says it timed out); any other error unchanged."""
    text = str(error)
    if not (isinstance(error, dist.DistBackendError) or "timed out" in text.lower() or "timeout" in text.lower()):
        return error
    return RankingError(
        f"rank {rank()}: a collective waited more than {timeout_s:g} s (--collective-timeout-s) for "
        f"another rank, which is frozen or gone; {advice}"
    )


def ignore_stop_signals(worker_id: int = 0, rank_pid: int | None = None) -> None:
    """A DataLoader worker's ``worker_init_fn``: stop signals from anyone but its rank are ignored.

    A signal to every process of a job (Slurm preemption, scancel, ``kill -- -PGID``) must reach the ranks only,
    which checkpoint and exit; a worker that died of it crashed its rank first ("DataLoader worker ... killed by
    signal"). The rank's own SIGTERM (the DataLoader's ``terminate()`` at shutdown, multiprocessing's at exit) still
    ends the worker: ignoring it too would hang the rank's exit on a worker stuck in its dataset. The signals are
    blocked and a thread reads who sent each (``sigwaitinfo``); the worker also dies with its rank (SIGKILL).
    ``rank_pid`` (bind it with ``functools.partial``) names the rank when the worker's parent is not the rank (a
    forkserver start method); by default it is the parent.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(
        target=_obey_parent_only, args=(rank_pid or os.getppid(),), name="stop-signals", daemon=True
    ).start()
    _set_parent_death_signal(signal.SIGKILL)


def _obey_parent_only(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(set(STOP_SIGNALS))
        if info.si_pid == parent:  # asked to end by its rank: a clean exit, which torch's SIGCHLD check accepts
            os._exit(0)


def _set_parent_death_signal(sig: signal.Signals) -> bool:
    """Linux ``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` when the thread that started us exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def launched() -> bool:
    """Started by torchrun / ``accelerate launch`` (a rank process whose parent is the launcher's agent)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def stop_with_launcher(sig: signal.Signals = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its launcher dies (Linux ``PR_SET_PDEATHSIG``).

    torch elastic starts ranks in sessions of their own, so a launcher killed by SIGKILL (or an unhandled SIGUSR1)
    left them training with parent 1. With ``sig`` a stop signal, such a rank checkpoints and exits like on
    preemption. A launcher that died before this call is caught by comparing the parent with the one at import.
    """
    if launched() and _set_parent_death_signal(sig) and os.getppid() != LAUNCHER_PID:
        os.kill(os.getpid(), sig)


def any_rank_of(flags: Tensor) -> list[bool]:
    """``any_rank`` of each flag of a 1-d tensor (on this rank's device), in one all-reduce (a collective).

    The flags travel as the digits of one integer in base world_size + 1, summed: a scalar all-reduce costs the
    same as ``any_rank``'s (a 3-element one took 2-3 times as long on gloo), and NCCL has no bitwise OR.
    """
    base = world_size() + 1
    weights = base ** torch.arange(len(flags), device=flags.device, dtype=torch.int64)
    packed = (flags.to(torch.int64) * weights).sum()
    if is_distributed():
        dist.all_reduce(packed)
    total = int(packed.item())
    return [total // base**digit % base > 0 for digit in range(len(flags))]


def shutdown() -> None:
    """Destroy the process group; torchrun reports an error at exit when it is left alive."""
    if is_distributed():
        dist.destroy_process_group()


class StopRequest:
    """Set by SIGUSR1, SIGTERM or SIGINT (or the launcher's death); the trainer finishes its step, checkpoints and
    exits with EX_TEMPFAIL. A second SIGINT (Ctrl-C again: the user will not wait for the checkpoint) exits at once
    with status 130, without a checkpoint; the DataLoader workers die with the rank (their parent-death signal).
    A SIGINT within ``SAME_INTERRUPT_S`` of the first request is the same Ctrl-C arriving twice: torchrun forwards
    the signal it got to its ranks, which may have had it directly too.

    A context manager: the previous handlers come back on exit, so an in-process launcher (submitit) keeps its own.
    ``on_request`` runs in the handler (the trainer uses it to cut short a wait for a batch that does not come).
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.on_request: Callable[[], None] | None = None
        self._since = 0.0  # when the first stop request came (time.monotonic)
        self._previous: dict[signal.Signals, signal._HANDLER] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.requested and time.monotonic() - self._since > SAME_INTERRUPT_S:
            os.write(
                2,
                f"rank {launched_rank()}: interrupted again: exiting now, without a checkpoint "
                f"(the last is kept)\n".encode(),
            )
            os._exit(EXIT_INTERRUPTED)  # not KeyboardInterrupt: a rank inside a collective would not see it
        if not self.requested:
            self._since = time.monotonic()
        self.signal = signal.Signals(signum)
        if self.on_request is not None:
            self.on_request()

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        stop_with_launcher(signal.SIGTERM)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
