"""Files appear under their final names only when complete: write a temporary name, fsync, rename.

Every durable write of the project goes through here: config.yaml, metrics.jsonl, checkpoints' parts, shards,
manifests, evaluation files and pictures.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ranking.core.errors import RankingError


def temporary_name(path: Path) -> Path:
    """The name a file is written under before it is renamed to ``path``; readers skip names like it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], object],
                     before_publish: Callable[[Path], object] | None = None) -> Path:
    """Write through ``write(file)`` under a temporary name in the same folder, fsync, then rename to ``path``.

    ``before_publish(temporary_path)`` runs on the complete, synced file before the rename (a sha256 of what is about
    to appear, say); an exception there or in ``write`` leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_publish is not None:
            before_publish(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda f: f.write(text.encode()))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync it: a crash leaves at most a torn last line, which readers skip."""
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | os.PathLike, if_missing: str) -> Any:
    """A JSON file's content; a missing or unparsable file is a one-line RankingError (``if_missing`` says why)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RankingError(f"{path}: {if_missing}") from None
    except (ValueError, OSError) as e:
        raise RankingError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


LOCK = ".lock"  # FOLDER/.lock: who writes FOLDER now (flock; the file stays, the lock goes with its holder)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``FOLDER/.lock`` (the folder is created) while ``what`` writes the folder.

    A second writer fails at once with one line naming the holder's pid and host. The kernel drops the lock when
    its holder exits, however it exits, so a crash never leaves a stale lock; the file itself is left in place
    (removing it would let a waiting writer lock a file nobody else sees).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RankingError(f"{folder}: in use by {holder}; wait for it to end or choose another "
                               "folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def check_writable_folder(path: str | os.PathLike, flag: str) -> None:
    """Before any work: ``path`` is a folder or can become one, and files can be written there (a probe file is
    created and removed in the nearest existing folder, which also catches read-only file systems and root)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RankingError(f"{path}: {flag} exists and is not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RankingError(f"{path}: {flag} cannot be created: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RankingError(f"{path}: {flag} is not writable ({existing}: {e.strerror})") from None
