"""Submitit launchers: one task per GPU (or per CPU process), each running a stage's ``main(argv)`` in-process.

Every task exports the torch.distributed environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) from
submitit's job environment, so ``Accelerator()`` inside the stage joins the same process group that ``accelerate
launch`` would have set up. ``--cluster local`` runs the tasks as processes on this machine, ``--cluster debug``
runs one task in this process (pdb works).

Time limit and preemption: submitit asks Slurm for USR2 ``signal_delay_s`` before the limit and, by default,
requeues at once. A training task instead hands the signal to the trainer as USR1 (the trainer's stop request),
waits for it to checkpoint and exit 75, and only then lets submitit requeue the job, whose ``checkpoint()`` adds
``--resume latest``.

Submitit's folder (``--folder``) holds the job's pickles, which the compute node unpickles: it is created private
(0700), by default under the user's cache, and refused when others may write to it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from ranking.core.errors import EXIT_REQUEUE, RankingError
from ranking.core.flags import ArgumentParser, add_dataclass_flags, at_least, build

CLUSTERS = ("slurm", "local", "debug")
# sbatch parameters the launcher sets itself -> the flag that sets them (--sbatch refuses them)
OWN_PARAMETERS = {
    "nodes": "nodes",
    "ntasks_per_node": "tasks-per-node",
    "gpus_per_node": "gpus-per-node",
    "cpus_per_task": "cpus-per-task",
    "time": "timeout-min",
    "signal": "signal-delay-s",
    "partition": "partition",
    "job_name": "job-name",
    "account": "account",
    "qos": "qos",
    "mem": "mem",
    "constraint": "constraint",
    "exclusive": "exclusive",
    "output": "folder",
    "error": "folder",
}


@dataclass
class LaunchConfig:
    cluster: str = "slurm"  # slurm | local (processes on this machine) | debug (one task in this process)
    nodes: int = 1  # Slurm nodes
    gpus_per_node: int = 8  # 0: CPU processes over gloo
    tasks_per_node: int = 0  # processes per node; 0 means one per GPU (one on a CPU node)
    cpus_per_task: int = 8  # CPU cores per task (DataLoader workers and decoding)
    timeout_min: int = 24 * 60  # the job's time limit in minutes (a requeue starts a new one)
    signal_delay_s: int = 120  # time-limit warning, enough to write a checkpoint
    partition: str = ""  # Slurm partition; empty: the cluster's default
    account: str = ""  # Slurm account to charge (sbatch --account); many clusters refuse a job without one
    qos: str = ""  # Slurm quality of service (sbatch --qos); empty: the account's default
    mem: str = ""  # memory per node in Slurm's units, e.g. 200G (sbatch --mem); empty: the partition's default
    constraint: str = ""  # node features to require, e.g. a100|h100 (sbatch --constraint)
    exclusive: bool = False  # the nodes to this job alone (sbatch --exclusive)
    # more sbatch parameters as KEY=VALUE (or KEY alone for a switch), e.g. --sbatch reservation=r1 mail-type=END;
    # they go to submitit's slurm_additional_parameters, so any sbatch option works
    sbatch: list[str] = field(default_factory=list)
    job_name: str = ""  # defaults to ranking-STAGE
    # submitit's job pickles (the compute node unpickles them: whoever can write there runs code in your job) and
    # the tasks' logs; created private (0700); empty: ~/.cache/deep-ranking/submitit ($XDG_CACHE_HOME honoured)
    folder: str = ""
    wait: bool = False  # block until the job ends and exit with its status

    def validate(self) -> None:
        if self.cluster not in CLUSTERS:
            raise RankingError(f"--cluster must be one of {', '.join(CLUSTERS)}; got {self.cluster!r}")
        for name in ("nodes", "cpus_per_task", "timeout_min"):
            at_least(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        if self.gpus_per_node < 0 or self.tasks_per_node < 0:
            raise RankingError("--gpus-per-node and --tasks-per-node cannot be negative")
        if self.cluster != "slurm" and self.nodes > 1:
            raise RankingError(f"--cluster {self.cluster} runs on this machine only; got --nodes {self.nodes}")
        self.additional_parameters()

    def additional_parameters(self) -> dict[str, str | bool]:
        """--sbatch KEY=VALUE ... as submitit's slurm_additional_parameters (keys with _ for -, a bare KEY is a
        switch); a malformed item or a parameter this launcher sets from its own flag is a one-line error."""
        parameters: dict[str, str | bool] = {}
        for item in self.sbatch:
            key, has_value, value = item.partition("=")
            key = key.strip().lstrip("-").replace("-", "_")
            if not re.fullmatch(r"[a-z][a-z0-9_]*", key) or (has_value and not value):
                raise RankingError(
                    f"--sbatch {item!r}: give sbatch parameters as KEY=VALUE (e.g. mail-type=END) or KEY for a switch"
                )
            if key in OWN_PARAMETERS:
                raise RankingError(f"--sbatch {item}: set it with --{OWN_PARAMETERS[key]} instead")
            parameters[key] = value if has_value else True
        return parameters


class StageTask(submitit.helpers.Checkpointable):
    """Runs ``MODULE.main(argv)`` on every task; on a time limit submitit resubmits it unchanged."""

    def __init__(self, module: str, argv: list[str], use_cpu: bool) -> None:
        self.module = module
        self.argv = list(argv)
        self.use_cpu = use_cpu

    def __call__(self) -> int:
        export_distributed_environment(self.use_cpu)
        return self.run_stage()

    def run_stage(self) -> int:
        stage = importlib.import_module(self.module)
        return int(stage.main(self.argv) or 0)


class TrainTask(StageTask):
    """The trainer: the time-limit signal becomes the trainer's stop request; requeue once it has checkpointed."""

    def __call__(self) -> int:
        export_distributed_environment(self.use_cpu)
        time_limit = time_limit_signal()
        requeue = signal.getsignal(time_limit)  # submitit's checkpoint-and-requeue handler (in a submitit job)
        signal.signal(time_limit, _ask_trainer_to_stop)
        # Until the trainer installs its handler a stop request is dropped rather than killing the task.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        code = self.run_stage()
        if code == EXIT_REQUEUE and callable(requeue):
            # Rank 0 pickles checkpoint() and requeues (Slurm: scontrol requeue; local: the controller reruns the
            # tasks), then exits; the other ranks return.
            requeue(time_limit, None)
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(TrainTask(self.module, with_resume(self.argv), self.use_cpu))


def time_limit_signal() -> signal.Signals:
    """The signal submitit asks Slurm for before the time limit (USR2 unless SUBMITIT_PREEMPT_SIGNAL says)."""
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


def _ask_trainer_to_stop(signum: int, frame) -> None:
    os.kill(os.getpid(), signal.SIGUSR1)


def with_resume(argv: list[str]) -> list[str]:
    """``argv`` with ``--resume latest`` (replacing any earlier ``--resume``, and dropping ``--overwrite``: a
    requeued job continues its own run, which the --overwrite that started it would move aside)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume=") and arg != "--overwrite":
            out.append(arg)
    return out + ["--resume", "latest"]


def export_distributed_environment(use_cpu: bool) -> None:
    """torchrun's environment variables for this task; CPU tasks take accelerate's gloo path."""
    env = submitit.JobEnvironment()
    if use_cpu:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    if env.num_tasks == 1:
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does for several processes per node
    # Keep every GPU visible: accelerate picks cuda:LOCAL_RANK itself.
    dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["MASTER_ADDR"] = node_address(dist.master_addr, env.num_nodes)
    if use_cpu and env.num_nodes > 1 and not os.environ.get("GLOO_SOCKET_IFNAME"):
        # gloo binds each rank to its host name's address, a loopback one wherever /etc/hosts maps the name there,
        # and the other nodes cannot connect to it: the interface that reaches the main node (as slurm/common.sh)
        interface = interface_to(os.environ["MASTER_ADDR"])
        if interface and interface != "lo":
            os.environ["GLOO_SOCKET_IFNAME"] = interface


def interface_to(address: str) -> str | None:
    """The network interface this host reaches ``address`` through: the one holding it if it is this host's own,
    else the route's. None when it cannot be told (an unresolvable name, no route)."""
    import psutil  # accelerate's dependency

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))  # a UDP connect only picks the route and the source address: nothing is sent
            local = probe.getsockname()[0]
    except OSError:
        return None
    return next(
        (name for name, addresses in psutil.net_if_addrs().items() if any(a.address == local for a in addresses)),
        None,
    )


def node_address(node: str, num_nodes: int) -> str:
    """An address for ``node`` that every node can reach: Slurm's NodeAddr, or loopback on a single node.

    A host name that does not resolve would make c10d retry until the time limit instead of failing.
    """
    if num_nodes == 1:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-n", node, "-o", "%o"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return node
    return out[0] if out else node


def parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The launcher's flags (LaunchConfig fields); the stage adds its own."""
    p = ArgumentParser(
        prog=f"python -m jobs.{stage}",
        description=description,
        usage=f"python -m jobs.{stage} [launcher flags] [-- ranking {stage} flags]",
        epilog=f"Arguments after -- go to ranking.{stage} unchanged.",
    )
    add_dataclass_flags(p, LaunchConfig)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str]) -> tuple[LaunchConfig, argparse.Namespace, list[str]]:
    """(launcher config, the stage's own flags, the arguments after ``--``)."""
    passthrough: list[str] = []
    if "--" in argv:
        argv, passthrough = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = p.parse_args(argv)
    return launch_config(args), args, passthrough


def launch_config(args: argparse.Namespace) -> LaunchConfig:
    return build(LaunchConfig, None, vars(args))


def default_folder() -> Path:
    """Submitit's folder when --folder is not given: under the user's cache, private, on the home file system that
    login and compute nodes share."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "deep-ranking" / "submitit"


def private_folder(folder: str) -> Path:
    """``folder`` (or ``default_folder()``), created with mode 0700. The job's pickles there are unpickled on the
    compute node, so a folder others may write to is refused: they could run code in the job."""
    path = Path(folder) if folder else default_folder()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = path.stat().st_mode
    except OSError as e:
        raise RankingError(f"--folder {path}: cannot create it ({e.strerror})") from None
    if mode & 0o022:
        raise RankingError(
            f"--folder {path}: others may write to it (mode {mode & 0o777:o}), and the compute node "
            f"unpickles the job from it: chmod 700 {path}, or give another --folder"
        )
    return path


def executor(config: LaunchConfig, stage: str) -> submitit.AutoExecutor:
    tasks = config.tasks_per_node or max(config.gpus_per_node, 1)
    if config.cluster == "debug":
        tasks = 1
    ex = submitit.AutoExecutor(folder=private_folder(config.folder), cluster=config.cluster)
    params = dict(
        name=config.job_name or f"ranking-{stage}",
        nodes=config.nodes,
        tasks_per_node=tasks,
        gpus_per_node=config.gpus_per_node,
        cpus_per_task=config.cpus_per_task,
        timeout_min=config.timeout_min,
        stderr_to_stdout=True,
        slurm_signal_delay_s=config.signal_delay_s,
    )
    for name in ("partition", "account", "qos", "mem", "constraint"):
        if getattr(config, name):
            params[f"slurm_{name}"] = getattr(config, name)
    if config.exclusive:
        params["slurm_exclusive"] = True
    if config.sbatch:
        params["slurm_additional_parameters"] = config.additional_parameters()
    ex.update_parameters(**params)
    return ex


def submit(config: LaunchConfig, stage: str, task: StageTask) -> submitit.Job:
    """Submit ``task``; a cluster that refuses it (sbatch failed, no Slurm here) is one line, not submitit's
    traceback."""
    try:
        job = executor(config, stage).submit(task)
    except (submitit.core.utils.FailedJobError, OSError, subprocess.SubprocessError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise RankingError(f"--cluster {config.cluster}: could not submit the {stage} job: {reason}") from None
    print(f"submitted {stage} job {job.job_id} ({config.cluster}); logs: {job.paths.stdout}", flush=True)
    return job


def wait(job: submitit.Job) -> int:
    """Block until the job ends; its status is rank 0's return value (75 never reaches here: it requeues)."""
    try:
        return int(job.results()[0] or 0)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        print(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1


def run(stage: str, task: StageTask, config: LaunchConfig) -> int:
    job = submit(config, stage, task)
    return wait(job) if config.wait or config.cluster == "debug" else 0
