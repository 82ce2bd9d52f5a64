"""Files a long run writes: an exclusive lock per target, and disk space reserved up front.

- :func:`exclusive_lock` keeps two runs from writing the same score file or checkpoint
  directory. It takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a lock file next to the target
  (``scores.npy.lock``, ``<checkpoint_dir>/.lock``) and fails at once, naming the target and
  the holder, when another process holds it. The lock is released (and the lock file removed)
  when the run ends, also on errors; a killed process releases it with its open files. Under
  ``torch.distributed`` the ranks of one run share their files, so only rank 0 locks and every
  rank learns the outcome; a second run's rank 0 is refused, and with it all of its ranks.
  ``flock`` works on local file systems and, on Linux, on NFS (emulated with ``fcntl`` locks).
  Without ``fcntl`` (Windows) nothing is locked.
- :func:`reserve` allocates a file's full size before any work (``os.posix_fallocate`` where
  available, else zeros written in 64 MiB chunks): a memory-mapped file on a full disk would
  otherwise kill the process with SIGBUS at the first page that cannot be stored. A disk too
  small is an :class:`OSError` naming the path and the bytes needed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import Iterator

from .exceptions import RunLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_CHUNK = 64 << 20


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(200).strip() or "unknown"
    except OSError:
        return "unknown"


def _acquire(path: str, what: str) -> int:
    """Opens and flocks ``path``; returns the descriptor, or raises :class:`RunLockedError`."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{what} is being written by another process (pid/host {_holder(path)} holds the "
                f"lock {path}). Two runs writing one target would mix their results: wait for "
                "the other run to finish, or write to another path."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder we raced with may have removed the file it locked: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}@{socket.gethostname()}".encode())
            return fd
        os.close(fd)
    raise RunLockedError(f"Could not lock {path} for {what}: it kept being replaced by other processes.")


@contextlib.contextmanager
def exclusive_lock(path: str, what: str) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` for the enclosed run (see the module docstring).

    Args:
        path: the lock file (created in an existing or new directory).
        what: names the locked target in the error, e.g. ``"the score file scores.npy"``.

    Raises:
        RunLockedError: another process holds the lock (on every rank of a distributed run).
    """
    from .distributed import all_gather_objects, rank_and_world

    fd, problem = None, None
    if fcntl is not None and rank_and_world()[0] == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            fd = _acquire(path, what)
        except RunLockedError as error:
            problem = str(error)
    outcomes = all_gather_objects(problem)
    if outcomes[0] is not None:
        if fd is not None:
            os.close(fd)
        raise RunLockedError(outcomes[0])
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still holding it: a waiting process re-checks the inode
            os.close(fd)


def reserve(path: str, size: int, data_offset: int = 0) -> None:
    """Allocates the first ``size`` bytes of the existing file ``path`` on disk (see the module
    docstring). Without ``posix_fallocate`` the bytes from ``data_offset`` on are overwritten
    with zeros (a header before it is kept).

    Raises:
        OSError: the file system cannot hold ``size`` bytes (``errno`` from the system).
    """
    with open(path, "r+b") as f:
        try:
            _allocate(f, size, data_offset)
        except OSError as error:
            free = _free_bytes(path)
            raise OSError(
                error.errno,
                f"Cannot reserve {size} bytes for {path}: {os.strerror(error.errno or errno.EIO)}"
                + (f" ({free} bytes free on its file system)" if free is not None else "")
                + ". Free disk space, or write the scores to another file system.",
                path,
            ) from error


def _allocate(f, size: int, start: int) -> None:
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(f.fileno(), 0, size)
            return
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
    f.seek(start)
    zeros = bytes(min(_CHUNK, max(size - start, 0)))
    while start < size:  # a hole in a sparse file takes disk space only once written
        n = min(len(zeros), size - start)
        f.write(zeros[:n])
        start += n
    f.flush()
    os.fsync(f.fileno())


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize
