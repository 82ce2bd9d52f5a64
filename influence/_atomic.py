"""Durable, atomic file writes that refuse to replace anything but a regular file.

:func:`atomic_write` writes a file in four steps, so that a crash at any point leaves either
the old file or the complete new one under the final name, and a completed call survives a
power loss:

1. create a temporary file next to the target, named ``.influence-tmp-<pid>-<random>-<host>-<name>``
   (``<host>``: 8 hex digits of a hash of the host name), with the permissions of the file it
   replaces (else the umask's), and hold an exclusive :func:`fcntl.flock` on it while writing;
2. write the bytes, flush, ``fsync`` the file;
3. ``os.replace`` it onto the target;
4. ``fsync`` the directory, so that the rename itself is on disk.

A process killed between 1 and 3 (``kill -9``, out-of-memory killer, power loss) leaves its
temporary file behind. Every write into a directory first removes the library's stale
temporary files there (:func:`sweep`): a temporary file is stale when nobody holds its lock
and either it was written on this host by a process that is no longer running (or by this
process, but not by a write in progress), or it has not been modified for an hour (a file
of another host, whose process cannot be checked). A file whose lock is held is never
removed, on file systems whose locks are shared between hosts (NFSv4, Lustre and GPFS with
flock enabled) not even another host's.

Targets: a path that exists and is not a regular file (a directory, a device such as
``/dev/full``, a FIFO, a socket) is refused with :class:`StorageError` before anything is
written, and so is a symbolic link: writing through it could replace a file outside the
directory the caller named (the classic symlink attack on shared directories), and replacing
it would silently break the link. Save to the link's target (``os.path.realpath(path)``) to
replace the file it points to.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import threading
import time
from typing import Any, Callable

from .exceptions import InfluenceError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so no sweeping (nothing can tell a live writer)
    fcntl = None

_PREFIX = ".influence-tmp-"
_TEMP = re.compile(r"\.influence-tmp-(\d+)-([0-9a-f]{8})-([0-9a-f]{8})-")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_IDLE_SECONDS = 3600.0
_in_progress: set[str] = set()  # this process's temporary files being written (any thread)
_lock = threading.Lock()


class StorageError(InfluenceError, ValueError):
    """A file could not be written or read as an influence file.

    The base of :class:`~influence.io.CorruptedFileError` and
    :class:`~influence.io.FormatVersionError`.

    Examples:
        A safetensors file that influence did not write:

        >>> import os, tempfile, torch, influence
        >>> from safetensors.torch import save_file
        >>> path = os.path.join(tempfile.mkdtemp(), "weights.safetensors")
        >>> save_file({"x": torch.zeros(1)}, path)
        >>> influence.InfluenceEstimator.load(path, torch.nn.Linear(3, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence._atomic.StorageError: ... is a safetensors file without influence metadata: it was not written by influence.
    """


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_target(path: str) -> None:
    """Raises :class:`StorageError` unless ``path`` is absent or a regular file (not a link)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise StorageError(f"Cannot write {path}: a part of its directory is a file, not a directory.") from None
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise StorageError(
            f"{path} is a symbolic link (to {os.readlink(path)}): influence does not write "
            f"through links. Save to {os.path.realpath(path)} to replace the file it points to, "
            "or remove the link."
        )
    hint = f"; pass a file path, e.g. {os.path.join(path, 'estimator.safetensors')}" if stat.S_ISDIR(mode) else ""
    raise StorageError(f"{path} is {_kind(mode)}, not a regular file: refusing to replace it{hint}.")


def check_source(path: str) -> None:
    """Raises unless ``path`` (links followed) is a regular file, so reading cannot block or
    read a device."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"No such influence file: {path}.") from None
    if not stat.S_ISREG(mode):
        raise StorageError(f"{path} is {_kind(mode)}, not an influence file.")


def temp_name(path: str) -> str:
    """A fresh temporary path next to ``path``, named so that :func:`sweep` recognises it."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{_HOST}-{name[:100]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _stale(path: str, pid: int, host: str, mtime: float) -> bool:
    """Whether the owner of a temporary file is gone (the lock is checked separately)."""
    if time.time() - mtime > _IDLE_SECONDS:
        return True
    if host != _HOST:
        return False
    if pid == os.getpid():
        with _lock:
            return path not in _in_progress
    return not _alive(pid)


def sweep(directory: str) -> list[str]:
    """Removes the library's stale temporary files in ``directory`` (see the module
    docstring); returns their paths. Files of other programs are never touched."""
    if fcntl is None:
        return []
    removed = []
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(_PREFIX)]
    except OSError:
        return []
    for entry in entries:
        match = _TEMP.match(entry.name)
        if not match:
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # gone already, a link, or unreadable
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or not _stale(entry.path, int(match[1]), match[3], info.st_mtime):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a writer holds it
                continue
            if os.path.samestat(info, os.lstat(entry.path)):
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _fsync_directory(directory: str) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:  # a directory we may write but not read cannot be synced
        return
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems cannot sync a directory
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Writes a file atomically and durably: ``write`` receives the open binary temporary
    file; it is fsynced, renamed to ``path`` and the directory fsynced (module docstring).

    Raises:
        StorageError: ``path`` exists and is not a regular file (a directory, a device, a
            FIFO, a symbolic link), or its directory is not one.
    """
    path = os.fspath(path)
    check_target(path)
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else None
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StorageError(f"Cannot write {path}: a part of {directory} is a file, not a directory.") from None
    sweep(directory)
    tmp = temp_name(path)
    with _lock:
        _in_progress.add(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)  # a replaced file keeps its permissions
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # under the lock: the sweeper never sees a finished file
        _fsync_directory(directory)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    finally:
        with _lock:
            _in_progress.discard(tmp)
