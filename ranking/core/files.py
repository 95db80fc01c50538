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
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ranking.core.errors import RankingError


def temporary_name(path: Path) -> Path:
    """The name a file is written under before it is renamed to ``path``; readers skip names like it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], object],
    before_publish: Callable[[Path], object] | None = None,
) -> Path:
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


MAX_JSON_BYTES = 256 * 2**20  # a project's JSON file (manifest, checkpoint.json, model.json, metrics.json)


def file_kind(mode: int) -> str:
    """What a path is, in words, when it is not a regular file (``os.stat``'s ``st_mode``)."""
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, advice: str = "") -> Iterator[IO[bytes]]:
    """``path`` opened for reading only if it is a regular file. Opened without blocking and checked on the open file
    (``fstat``), so a FIFO or device in its place is refused at once by name, never waited on or read forever.
    ``advice`` ends the refusal (``"; remove it from the source"``)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RankingError(f"{path}: cannot read ({e.strerror})") from None
    with open(fd, "rb", buffering=0) as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RankingError(f"{path}: {file_kind(mode)}, not a regular file{advice}")
        yield f


def read_regular(path: str | os.PathLike, limit: int, limit_name: str, advice: str = "") -> bytes:
    """The bytes of a regular file (``open_regular``) of at most ``limit`` bytes (``limit_name`` names the limit in
    the refusal), checked before reading and while reading, so a file that grows cannot eat memory either."""

    def too_large(size: int | str) -> RankingError:
        return RankingError(f"{path}: {size} bytes, over the limit of {limit} bytes per file ({limit_name})")

    with open_regular(path, advice) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise too_large(size)
        try:
            chunks, left = [], limit + 1
            while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                chunks.append(chunk)
                left -= len(chunk)
        except OSError as e:
            raise RankingError(f"{path}: cannot read ({e.strerror})") from None
    data = b"".join(chunks)
    if len(data) > limit:  # it grew after the stat
        raise too_large(f"more than {limit}")
    return data


def read_json(path: str | os.PathLike, if_missing: str, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file's content; a missing, unparsable, oversized or not regular file (a FIFO, a device) is a one-line
    RankingError (``if_missing`` says why it should be there). The project's own files are read like untrusted
    images: an index or an evaluation folder is meant to be copied and shared."""
    try:
        data = read_regular(path, limit, "ranking.core.files.MAX_JSON_BYTES")
    except FileNotFoundError:
        raise RankingError(f"{path}: {if_missing}") from None
    try:
        return json.loads(data)
    except ValueError as e:
        raise RankingError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:
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
    with lock_file(folder / LOCK, folder, what) as path:
        yield path


def sibling_lock_path(folder: str | os.PathLike) -> Path:
    """``.NAME.lock`` beside ``folder``: the lock of a folder that is replaced whole (``publish_folder``), whose own
    ``.lock`` would go with the old folder. ``lock_file(..., remove=True)`` takes it and leaves nothing behind."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}{LOCK}")


@contextlib.contextmanager
def lock_file(path: Path, guarded: str | os.PathLike, what: str, remove: bool = False) -> Iterator[Path]:
    """``folder_lock``'s mechanism on any lock file ``path`` (its folder must exist); ``guarded`` is what the refusal
    names as in use. ``remove``: the file is removed on release; then a lock is only held once the file locked is
    still the one at ``path`` (another writer may have removed it meanwhile), so two writers can never both hold it."""
    if os.environ.get(NO_LOCK, "") not in ("", "0"):
        yield path
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RankingError(f"{guarded}: cannot take the lock {path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RankingError(f"{guarded}: in use by {holder}; wait for it to end or choose another folder") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: the file system does not lock
            os.close(fd)
            raise RankingError(
                f"{path}: cannot lock ({e.strerror or e}) on {file_system(path.parent)}; set {NO_LOCK}=1 to write "
                "without the lock, at the risk that two jobs writing this folder overwrite each other"
            ) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # removed by the writer before us as we opened it: lock the file there now
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
        except OSError:  # a full disk: the lock is held all the same; only the refusal's "who" is lost
            pass
        yield path
    finally:
        if remove:
            path.unlink(missing_ok=True)  # still locked: whoever opened it retries on the new file
        os.close(fd)


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` beside ``final`` (``temporary_name``) left by a writer that was killed: those whose
    pid is not a live process here. Call it holding ``final``'s lock. Returns what was removed."""
    final = Path(final)
    prefix = f".{final.name}.tmp-"
    removed = []
    try:
        names = [entry.name for entry in os.scandir(final.parent) if entry.name.startswith(prefix)]
    except OSError:
        return []
    for name in names:
        pid = name[len(prefix) :]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        stale = final.parent / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0: nothing is sent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return pid > 0


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


def check_output_file(path: str | os.PathLike, flag: str, overwrite: bool = True) -> Path:
    """Before any work: ``path`` can be written as a file: not a folder, its folder can be created and written
    (``check_writable_folder``), and, unless ``overwrite``, no file is there yet. One line naming ``flag`` if not."""
    path = Path(path)
    if path.is_dir():
        raise RankingError(f"{path}: {flag} is a folder; give a file name in it")
    if not overwrite and os.path.lexists(path):
        raise RankingError(f"{path}: {flag} exists; choose another name, or replace it with --overwrite")
    check_writable_folder(path.parent, f"{flag}'s folder")
    return path


def shown_name(name: str, one_line: bool = True) -> str:
    """A file name as printable text: each byte that is not UTF-8 (kept by ``os.fsdecode`` as a lone surrogate,
    which strict JSON readers and terminals reject) as ``\\xNN``, Python's ``backslashreplace``; with ``one_line``
    also control characters (a newline in a name) as ``\\n``, ``\\t`` or ``\\xNN``, so a name never breaks a table.
    ``ranking search`` prints file names so, in its table and in --json."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    if one_line and any(ord(c) < 32 or ord(c) == 127 for c in text):
        text = "".join(c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or ord(c) == 127 else c for c in text)
    return text
