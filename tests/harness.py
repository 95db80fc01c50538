"""What the tests share: paths, the shared data's rule, the test tiers (which tests start processes, and the guard
that keeps the fast lane free of them), a launcher of real gloo ranks, an in-process CLI refusal, the smoke run's
flags, readers of a run's files and of W&B's offline records, and small real-image fixtures' builders. Test modules
import from here, never from each other; conftest.py holds the pytest fixtures and hooks."""

from __future__ import annotations

import _posixsubprocess
import ast
import builtins
import contextlib
import inspect
import io
import json
import multiprocessing.process
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from ranking.core import config, flags
from ranking.folders.checkpoint import _write_manifest
from ranking.folders.shardformat import shard_paths
from ranking.learning.models import build_model

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# ../shared beside the clone (the real data, the test Slurm); RANKING_SHARED points elsewhere, e.g. at a missing
# folder to see what an outside contributor without it sees
SHARED = Path(os.environ.get("RANKING_SHARED") or REPO.parent / "shared")
SMOKE = REPO / "configs" / "smoke.yaml"  # a random-init ResNet-18: the defaults' pretrained Lite0 is too slow here
PER_CLASS = 6  # of the mini zip's 10 classes x 20 train images


def shared_file(relative: str) -> Path:
    """A file of ../shared (the real data, the test Slurm), or a one-line skip naming it where it is absent: an
    outside contributor has no ../shared. Under CI (CI=true) its absence fails the test instead, so a CI that lost
    ../shared cannot pass by skipping what it exists to check."""
    path = SHARED / relative
    if path.exists():
        return path
    message = f"{path} is missing: this test needs ../shared beside the repository (or RANKING_SHARED naming it)"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{message}; CI must have it", pytrace=False)
    pytest.skip(message)


# ---------------------------------------------------------------------------------------------------------------
# test tiers: a test that starts a process is `system`; `pytest -m "not system"` is the fast lane

SYSTEM = "system"


def qualified_name(obj: object) -> str:
    """``subprocess.run``, ``posix.system``, ``multiprocessing.context.BaseContext.Pool``: what a callable is,
    whichever name a test reached it by."""
    return f"{getattr(obj, '__module__', None) or ''}.{getattr(obj, '__qualname__', None) or ''}"


def _process_starters() -> frozenset[str]:
    import asyncio
    import concurrent.futures
    import multiprocessing
    import multiprocessing.pool

    import torch.multiprocessing

    starters: list[object] = [
        subprocess.Popen,
        subprocess.run,
        subprocess.call,
        subprocess.check_call,
        subprocess.check_output,
        subprocess.getoutput,
        subprocess.getstatusoutput,
        os.system,
        os.popen,
        os.fork,
        os.forkpty,
        os.posix_spawn,
        os.posix_spawnp,
        os.spawnv,
        os.spawnve,
        os.spawnvp,
        os.spawnvpe,
        os.spawnl,
        os.spawnle,
        os.spawnlp,
        os.spawnlpe,
        multiprocessing.Process,
        multiprocessing.Pool,
        multiprocessing.pool.Pool,
        concurrent.futures.ProcessPoolExecutor,
        torch.multiprocessing.spawn,
        torch.multiprocessing.start_processes,
        asyncio.create_subprocess_exec,
        asyncio.create_subprocess_shell,
    ]
    starters += [multiprocessing.get_context(method).Process for method in multiprocessing.get_all_start_methods()]
    return frozenset(map(qualified_name, starters))


PROCESS_STARTERS = _process_starters()
_OUTSIDE_TEST_CODE = tuple(
    str(p) for p in {REPO / "ranking", REPO / "jobs", Path(sys.prefix), Path(sys.base_prefix), Path(os.__file__).parent}
)
_verdicts: dict[Callable, str | None] = {}  # per function, not per code: closures differ in their cells


def _is_test_code(function: object) -> bool:
    """A function of the tests themselves (a test module, harness, a planted example), not of the package, the
    standard library or an installed one: the static check reads into these and no further."""
    filename = getattr(getattr(function, "__code__", None), "co_filename", "")
    return inspect.isfunction(function) and filename.endswith(".py") and not filename.startswith(_OUTSIDE_TEST_CODE)


def _local_imports(tree: ast.AST) -> dict[str, tuple[str, str | None]]:
    """Names bound by ``import x`` / ``from x import y`` inside the function: name -> (module, attribute)."""
    found: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0],
                    None,
                )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found[alias.asname or alias.name] = (node.module, alias.name)
    return found


def _imported(module: str, attribute: str | None) -> object:
    """What a local import names, if its module is loaded already. Nothing is imported here: every module that holds
    a way to start a process, and the harness, are loaded by now, so a module that is not cannot lead to one."""
    imported = sys.modules.get(module)
    if imported is None or attribute is None:
        return imported
    return getattr(imported, attribute, None) or sys.modules.get(f"{module}.{attribute}")


def _resolve(node: ast.expr, function: Callable, imports: dict[str, tuple[str, str | None]]) -> object:
    """The object a call's target names (``launch``, ``subprocess.run``, ``mp.start_processes``), looked up the way
    the function would at run time: its own imports, its closure, its module, the builtins; None when the target is
    computed (``ctx.Process``) or not found."""
    if isinstance(node, ast.Name):
        if node.id in imports:
            return _imported(*imports[node.id])
        code = function.__code__
        for name, cell in zip(code.co_freevars, getattr(function, "__closure__", None) or ()):
            if name == node.id:
                with contextlib.suppress(ValueError):  # an empty cell
                    return cell.cell_contents
                return None
        namespace = getattr(function, "__globals__", {})
        if node.id in namespace:
            return namespace[node.id]
        return getattr(builtins, node.id, None)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, function, imports)
        if inspect.ismodule(owner) or inspect.isclass(owner):  # nothing else is safe to getattr on
            return getattr(owner, node.attr, None)
    return None


def process_start(function: Callable) -> str | None:
    """How ``function`` starts a process, as the chain of calls that leads there ("run_evaluate -> subprocess.run"),
    or None when neither its source nor that of the test helpers it calls does. It reads test code only (see
    _is_test_code): a process the package starts (the shards' worker pool, W&B's service) is for the explicit
    ``@pytest.mark.system`` and the run-time guard to catch."""
    function = inspect.unwrap(function)
    if not hasattr(function, "__code__"):
        return None
    if function in _verdicts:
        return _verdicts[function]
    _verdicts[function] = None  # while reading it: a recursive helper adds nothing
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):  # no source to read (a builtin, a lambda in an odd place)
        return None
    if isinstance(definition := tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        tree = ast.Module(body=definition.body, type_ignores=[])  # decorators and defaults ran at import time
    imports = _local_imports(tree)
    verdict = None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = _resolve(node.func, function, imports)
        if target is None:
            continue
        if qualified_name(target) in PROCESS_STARTERS:
            verdict = ast.unparse(node.func)
        elif _is_test_code(target) and (inner := process_start(target)):
            verdict = f"{ast.unparse(node.func)} -> {inner}"
        if verdict:
            break
    _verdicts[function] = verdict
    return verdict


def process_start_of(item: pytest.Item) -> str | None:
    """How a collected test starts a process: through its own code, or through a fixture it requests, directly or
    through other fixtures ("fixture finished_run: train -> subprocess.run")."""
    function = getattr(item, "obj", None)
    if function is not None and (found := process_start(function)):
        return found
    fixture_info = getattr(item, "_fixtureinfo", None)  # pytest keeps the resolved fixtures (transitive) here
    for name in getattr(item, "fixturenames", ()):
        for definition in fixture_info.name2fixturedefs.get(name, ()) if fixture_info else ():
            if found := process_start(definition.func):
                return f"fixture {name}: {found}"
    return None


class ProcessGuard:
    """Refuses to start a process while a test outside the system tier runs, so the marking cannot rot: such a test
    fails at the call that would have started it (its traceback shows where), naming the test and the command.

    ``install`` wraps every way a process starts in Python: ``subprocess.Popen`` (run, check_output, os.popen and
    asyncio's subprocesses go through it), a multiprocessing ``Process.start`` (pools, torch's spawn, DataLoader
    workers), the raw ``os.fork`` / ``os.system`` / ``os.posix_spawn``, and ``_posixsubprocess.fork_exec`` beneath
    subprocess and multiprocessing's own helper processes."""

    def __init__(self) -> None:
        self.refusing_for: str | None = None
        self.started: list[str] = []
        self._installed: list[tuple[object, str, object]] = []

    def install(self) -> None:
        if self._installed:
            return
        self._wrap(
            subprocess.Popen,
            "__init__",
            lambda popen, args, *_, **__: (
                "subprocess: " + (" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
            ),
        )
        self._wrap(
            multiprocessing.process.BaseProcess,
            "start",
            lambda process: f"multiprocessing: {type(process).__name__} {process.name}",
        )
        for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp"):
            self._wrap(os, name, lambda *args, _name=name, **__: " ".join([f"os.{_name}", *map(str, args[:1])]))
        # beneath them all, what multiprocessing starts its helpers with (the resource tracker, the fork server)
        self._wrap(
            _posixsubprocess,
            "fork_exec",
            lambda args, *_, **__: "fork_exec: " + " ".join(os.fsdecode(a) for a in args or ()),
        )

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._installed):
            setattr(owner, name, original)
        self._installed.clear()

    def _wrap(self, owner: object, name: str, describe: Callable[..., str]) -> None:
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            if self.refusing_for is not None:
                self.refuse(describe(*args, **kwargs)[:300])
            return original(*args, **kwargs)

        guarded.__wrapped__ = original
        self._installed.append((owner, name, original))
        setattr(owner, name, guarded)

    def refuse(self, what: str) -> None:
        self.started.append(what)
        pytest.fail(self.complaint(self.refusing_for or "", what))

    @staticmethod
    def complaint(test: str, what: str) -> str:
        return (
            f"{test} started a process ({what}) but is not marked {SYSTEM}: add @pytest.mark.{SYSTEM}, or check "
            f"it without a process"
        )

    @contextlib.contextmanager
    def refusing(self, test: str) -> Iterator[None]:
        """While the block runs, starting a process fails ``test``; a refusal that something caught and swallowed
        on its way up fails it at the end of the block."""
        self.refusing_for, self.started = test, []
        try:
            yield
        finally:
            self.refusing_for = None
        if self.started:
            pytest.fail(self.complaint(test, self.started[0]), pytrace=False)


def cli_refusal(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``ranking ARGV`` run in this process the way the command line runs it (``ranking.cli.main``): assert that it
    refused with exit status 2 and one line on stderr, and return that line. A refusal needs no process; a few tests
    run the real command to show its line and exit status."""
    from ranking import cli

    with pytest.raises(SystemExit) as done:
        cli.main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1, (done.value.code, lines)
    return lines[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the rendezvous of a launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    args: list[str],
    processes: int = 2,
    timeout: float = 240,
    script: str | None = None,
    wait: bool = True,
    launcher_precision: str | None = "no",
    launcher_flags: tuple[str, ...] | list[str] = (),
    module: str = "ranking.train",
) -> subprocess.CompletedProcess | subprocess.Popen:
    """`accelerate launch` of ``module`` (or ``script``) on gloo CPU ranks, as a user would type it; W&B offline
    and silent."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher_flags,
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]
    if launcher_precision is not None:
        command += ["--mixed_precision", launcher_precision]
    command += [script] if script else ["-m", module]
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }
    if not wait:
        return subprocess.Popen(command + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=timeout)


def train_flags(shards: Path, run_dir: Path, **overrides) -> list[str]:
    flags = {
        "config": SMOKE,
        "shards": shards,
        "run-dir": run_dir,
        "image-size": 32,
        "embed-dim": 32,
        "shuffle-buffer": 50,
        "workers": 0,
        "mixed-precision": "no",
        "warmup-steps": 3,
        "log-every": 1,
        "no-progress": None,
        "wandb-tags": "test",
    } | overrides
    argv = []
    for name, value in flags.items():
        argv += [f"--{name}"] + ([] if value is None else [str(value)])
    return argv


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rank_steps(checkpoint_dir: Path) -> dict[int, int]:
    """The step each rank recorded in its own file of a checkpoint."""
    files = sorted(checkpoint_dir.glob("rng-rank*.pt"))
    return {int(f.stem.removeprefix("rng-rank")): torch.load(f, weights_only=True)["step"] for f in files}


def wandb_records(run_folder: Path):
    """The records of an offline run's `.wandb` file: wandb's LevelDB-style log of protobuf `Record`s.

    wandb 0.31 no longer ships a Python reader (the Go core writes the file), so this follows the format: a 7-byte
    file header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    block = 32768
    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    position, parts = 7, []
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zero padding up to the next block
            position += left_in_block
            continue
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_history_and_config(run_folder: Path) -> tuple[list[dict], dict]:
    def as_dict(items) -> dict:  # an item names its key in `key` or, path-like, in `nested_key`
        return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}

    history, run_config = [], {}
    for record in wandb_records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(as_dict(record.history.item))
        elif kind == "config":
            run_config |= as_dict(record.config.update)
        elif kind == "run":  # wandb.init(config=...)
            run_config |= as_dict(record.run.config.update)
    return history, run_config


def wandb_summary(run_folder: Path) -> dict:
    """An offline run's summary as W&B keeps it: every summary record's updates, in order."""
    summary: dict = {}
    for record in wandb_records(run_folder):
        if record.WhichOneof("record_type") == "summary":
            summary |= {
                item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update
            }
    return summary


def wandb_run(run_folder: Path):
    """An offline run's run record: its group, job type, display name, wandb.init's config."""
    return next(r.run for r in wandb_records(run_folder) if r.WhichOneof("record_type") == "run")


def write_smoke_run(run_dir: Path, shards: str, **overrides) -> Path:
    """A run folder with a random-init smoke network at step 5 (what `ranking train` leaves, without training)."""
    train_config = flags.build(
        config.TrainConfig, str(SMOKE), {"run_dir": str(run_dir), "shards": shards, "wandb": False, **overrides}
    )
    checkpoint = run_dir / "checkpoints" / "step-0000005"
    checkpoint.mkdir(parents=True)
    flags.save(train_config, run_dir / "config.yaml")
    torch.manual_seed(sum(map(ord, str(run_dir))) % 1000)
    model = build_model(train_config).eval()
    torch.save({"model": model.state_dict(), "step": 5, "wandb_run_id": "x"}, checkpoint / "state.pt")
    _write_manifest(checkpoint, 5)  # as `ranking train` does: a checkpoint without one loads with a warning
    (run_dir / "checkpoints" / "latest").symlink_to(checkpoint.name)
    return run_dir


def mini_jpegs(mini_zip: Path) -> dict[str, list[tuple[str, bytes]]]:
    """The first PER_CLASS train JPEGs of each class: wnid -> [(file name, bytes)]."""
    found: dict[str, list[tuple[str, bytes]]] = {}
    with zipfile.ZipFile(mini_zip) as z:
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) == 5 and parts[1] == "train" and name.endswith(".JPEG"):
                if len(found.setdefault(parts[2], [])) < PER_CLASS:
                    found[parts[2]].append((parts[4], z.read(name)))
    return found


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def odd_images(jpeg: bytes) -> dict[str, bytes]:
    """A PNG with transparency, a CMYK JPEG and a grayscale JPEG made from one of the real photos."""
    photo = Image.open(io.BytesIO(jpeg)).convert("RGB")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    return {
        "odd.png": encoded(rgba, "PNG"),
        "cmyk.jpg": encoded(photo.convert("CMYK"), "JPEG"),
        "gray.jpeg": encoded(photo.convert("L"), "JPEG"),
    }


def shard_samples(shards: Path, split: str) -> dict[int, tuple[int, bytes]]:
    """id -> (label, JPEG bytes), read straight from the tar files."""
    samples: dict[int, tuple[int, bytes]] = {}
    for path in shard_paths(shards, split):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    jpg = tar.extractfile(member.name[: -len("json")] + "jpg").read()
                    samples[meta["id"]] = (meta["label"], jpg)
    return samples


# ------------------------------------------------------------------- the trainer's faults, in real processes

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def stand_in_commands(bin_dir: Path, commands: dict[str, str]) -> Path:
    """Executable bash scripts named after cluster commands (sbatch, srun, scontrol), each running its body. With
    bin_dir first on PATH a test sees what a cluster would be asked, whether or not this machine has Slurm installed
    (tests/test_slurm.py installs it, so a test that relied on the real srun passed or failed by test order)."""
    bin_dir.mkdir(exist_ok=True)
    for name, body in commands.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def train_one(flags: list[str], timeout: float = 120, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m ranking.train` in one process (no launcher): the fastest real run of the trainer."""
    command = [sys.executable, "-m", "ranking.train", *flags, "--no-wandb"]
    if popen:
        return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)


def fault_flags(shards: Path, run_dir: Path, **overrides) -> list[str]:
    """The smoke run of tests/test_train.py, with 3 x 4 batches (the synthetic shards have 6 classes)."""
    return train_flags(shards, run_dir, **({"classes-per-batch": 3, "samples-per-class": 4} | overrides))


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a RankingError leaves on stderr (warnings and W&B aside), with exit status 2."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def copy_shards(shards: Path, target: Path) -> Path:
    shutil.copytree(shards, target, ignore=shutil.ignore_patterns(".*-class-counts.json"))
    return target


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"{what}: the process ended first"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def logged(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and bool(path.read_text().strip())


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [
        p
        for p in descendants(launcher.pid)
        if "RANK" in p.environ() and "ranking.train" in " ".join(p.cmdline()) and p.ppid() == launcher.pid
    ]


def reap(processes: list[psutil.Process]) -> None:
    """Kill whatever a failed test left running (only the processes this test started)."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def lying_class_counts(shards: Path, per_class: int) -> None:
    """A class-count cache claiming `per_class` images in every class: the sampler then waits for images that never
    come, which is how a stalled stream looks to the trainer (the cache is keyed by the manifest's shard list)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    counts = {str(label): per_class for label in range(len(manifest["classes"]))}
    (shards / ".train-class-counts.json").write_text(
        json.dumps({"shards": manifest["splits"]["train"]["shards"], "counts": counts})
    )


def fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s file system with a filler file (a full disk)."""
    with open(folder / ".filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_kib: int = 512, read_only: bool = False, full: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` mounted at ``folder`` (created) in this process by mount(2), no process started:
    ``read_only``, or ``full`` (a filler file takes every free byte). Skipped with one line where mounting is not
    permitted (not root, or a container without CAP_SYS_ADMIN); unmounted after."""
    import ctypes

    folder.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    ms_rdonly = 1  # <sys/mount.h>
    if (
        libc.mount(b"tmpfs", os.fsencode(folder), b"tmpfs", ms_rdonly if read_only else 0, f"size={size_kib}k".encode())
        != 0
    ):
        pytest.skip(
            f"cannot mount a tmpfs here ({os.strerror(ctypes.get_errno())}): the full-disk and read-only "
            "cases need root"
        )
    try:
        if full:
            fill(folder)
        yield folder
    finally:
        libc.umount2(os.fsencode(folder), 2)  # MNT_DETACH: also when a test left a file open


# ------------------------------------------------------------------------------------------------ Slurm jobs
# (tests/test_slurm.py on ../shared/slurm's single node, tests/test_slurm_two_nodes.py on tests/cluster/two_nodes.sh)


def job_info(env: dict[str, str], job_id: str) -> dict[str, str]:
    """JobState, Restarts, Reason... of `scontrol show job` (no accounting daemon here, so no sacct)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.2)


def slurm_in_queue(env: dict[str, str], job_id: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True).stdout.strip())


def sbatch(env: dict[str, str], logs: Path, *args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={logs}/%x-%j.out", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wandb_ids(run_dir: Path) -> list[str]:
    """The run id of every W&B offline run directory the trainer started (one per launch)."""
    return [p.name.rsplit("-", 1)[1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def nodes_idle(env: dict[str, str]) -> bool:
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()
    return bool(states) and set(states) == {"idle"}


def job_cleaned_up(env: dict[str, str], job_id: str) -> bool:
    """The nodes are idle and no slurmstepd of the job is left: Slurm reports the node idle while a step's slurmstepd
    still cleans up, and a job started then is killed ("Job credential revoked")."""
    steps = [
        p
        for p in psutil.process_iter(["cmdline"])
        if " ".join(p.info["cmdline"] or []).startswith(f"slurmstepd: [{job_id}.")
    ]  # its process title
    return nodes_idle(env) and not steps


# ------------------------------------------------------------------- a small index and the server over it


def photo_tree(mini_zip: Path, folder: Path, per_class: int = PER_CLASS) -> Path:
    """Class folders of the mini zip's first ``per_class`` train JPEGs each (10 classes), as a user's photos."""
    for wnid, files in sorted(mini_jpegs(mini_zip).items()):
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        for name, data in files[:per_class]:
            (folder / wnid / name).write_bytes(data)
    return folder


@contextlib.contextmanager
def full_precision_index() -> Iterator[None]:
    """`ranking index` in fp32 (set the Accelerate way), so a gallery image searched as a query finds itself at
    distance ~0, as queries are embedded in fp32."""
    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    try:
        yield
    finally:
        if before is None:
            del os.environ["ACCELERATE_MIXED_PRECISION"]
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = before


def tiny_index(root: Path, images: Path, name: str = "index") -> Path:
    """An index folder of ``images`` made by `ranking index` (in this process) with a random-init smoke network
    (16-d, 32 px): no training, a few seconds."""
    from ranking import index

    run = root / f"{name}-run"
    if not run.exists():
        write_smoke_run(run, "unused")
    with full_precision_index():
        assert index.main(["--checkpoint", str(run), "--images", str(images), "--out", str(root / name)]) == 0
    return root / name


@contextlib.contextmanager
def served(index: Path, *flags: str, log: Path | None = None) -> Iterator[str]:
    """`ranking serve --index INDEX --port 0 FLAGS` in a real process; yields its base URL (``http://host:port``),
    read from the first line it prints (to ``log``, beside the index by default), and stops it afterwards."""
    log = log or index.with_name(f"{index.name}-serve.log")
    command = [sys.executable, "-m", "ranking", "serve", "--index", str(index), "--port", "0", *flags]
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=ENV, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "http://" in log.read_text(), 120, f"ranking serve's first line in {log}", process)
        yield "http://" + log.read_text().split("http://")[1].split()[0].rstrip("/")
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
