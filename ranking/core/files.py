"""Files and folders appear under their final names only when complete: write a temporary name, fsync, rename.

Every durable write of the project goes through here: config.yaml, metrics.jsonl, checkpoints' parts, shards,
manifests, evaluation files and pictures; whole folders (checkpoints, index folders) through ``publish_folder``, and
symlinks (``checkpoints/latest``) through ``replace_link``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
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


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the names in ``folder`` durable (a rename is only on disk once its folder is synced)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """Every file and folder under ``folder`` on disk (files copied in, not written by write_atomically, too)."""
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_folder(root)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``): a reader sees one or the other,
    never neither. False where the system or the file system cannot (then the caller renames twice)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_by_renames(tmp: Path, final: Path) -> None:
    """Where paths cannot be exchanged: move ``final`` aside, rename ``tmp`` into place (``final`` is put back if
    that fails), then remove the old folder. ``final`` is missing between the two renames."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the complete folder ``tmp`` (beside ``final``, under a name readers skip) in place as ``final``.

    Its files are synced first and the parent folder after, so the name never points at data a crash could lose. A
    folder already named ``final`` is replaced: exchanged with ``tmp`` in one step where the kernel can, so that its
    readers find the old folder until the new one is there, then removed; elsewhere moved aside first
    (``replace_by_renames``). Returns ``final``.
    """
    tmp, final = Path(tmp), Path(final)
    _sync_tree(tmp)
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        fsync_folder(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now under the temporary name
    else:
        replace_by_renames(tmp, final)
    fsync_folder(final.parent)
    return final


def replace_link(link: str | os.PathLike, target: str) -> None:
    """Point the symlink ``link`` at ``target`` in one step: a new link under a temporary name, renamed over it."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp")  # one writer per folder (its lock): a name without a pid
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_folder(link.parent)


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
# RANKING_NO_LOCK=1: write without the lock where the file system has no flock (Lustre mounted noflock, NFS without
# lockd). The risk: nothing stops a second job writing the same folder, and the two overwrite each other's files.
NO_LOCK = "RANKING_NO_LOCK"


def file_system(path: str | os.PathLike) -> str:
    """``TYPE at MOUNT`` for the file system that holds ``path`` (the longest mount point of /proc/mounts above it),
    or ``an unknown file system`` where /proc/mounts cannot be read."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "an unknown file system"
    target = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")  # /proc/mounts writes a space in a path as \040
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[0])):
            best = (mount, fields[2])
    return f"{best[1]} at {best[0]}" if best else "an unknown file system"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``FOLDER/.lock`` (the folder is created) while ``what`` writes the folder.

    A second writer fails at once with one line naming the holder's pid and host. The kernel drops the lock when
    its holder exits, however it exits, so a crash never leaves a stale lock; the file itself is left in place
    (removing it would let a waiting writer lock a file nobody else sees). A file system without flock is one line
    naming it and ``RANKING_NO_LOCK=1``, which skips the lock (see NO_LOCK for the risk).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    if os.environ.get(NO_LOCK, "") not in ("", "0"):
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RankingError(f"{folder}: in use by {holder}; wait for it to end or choose another "
                               "folder") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: the file system does not lock
            raise RankingError(
                f"{path}: cannot lock ({e.strerror or e}) on {file_system(folder)}; set {NO_LOCK}=1 to write "
                "without the lock, at the risk that two jobs writing this folder overwrite each other") from None
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
