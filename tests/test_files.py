"""Score files and checkpoints: disk space reserved up front, one writer per target."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import _resume_worker as worker
from influence import InfluenceError
from influence import RunLockedError
from influence._files import exclusive_lock, reserve
from influence.scoring import Scorer

HERE = os.path.dirname(__file__)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")


def held(path):
    """Locks ``path`` through another open file description, as another process would."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242@elsewhere")
    return fd


# --------------------------------------------------------------------------- item 5: full disk
def test_a_disk_too_small_is_an_oserror_naming_path_and_size_before_any_work(tmp_path, monkeypatch):
    model, train, test = worker.problem()
    est = worker.score_estimator(model, train)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    monkeypatch.setattr(Scorer, "score_batch", lambda *a: pytest.fail("scored before the file was reserved"))
    nbytes = 3 * 12 * 8 + 128  # float64 matrix + .npy header
    with pytest.raises(OSError, match=rf"Cannot reserve {nbytes} bytes for .*s\.npy\.partial: No space left on device.*Free disk space") as info:
        est.pairwise_scores(test, train, out=tmp_path / "s.npy")
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []  # nothing left behind


def test_reserve_allocates_with_zeros_where_fallocate_is_missing(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"header")
    monkeypatch.delattr(os, "posix_fallocate")
    reserve(str(path), 5000, 6)
    data = path.read_bytes()
    assert len(data) == 5000 and data[:6] == b"header" and not any(data[6:])
    assert os.stat(path).st_blocks * 512 >= 5000  # allocated, not a hole


FULL_DISK = textwrap.dedent("""
    import os, sys
    import _resume_worker as worker
    from zoo import batches, classification_data
    if sys.argv[2] == "zeros":
        del os.posix_fallocate
    model, _, test = worker.problem()
    x, y = classification_data(n=4000, d_in=3, classes=2, seed=1)
    train = batches(x, y, 500)
    est = worker.score_estimator(model, train)
    try:
        est.pairwise_scores(test * 4, train, out=os.path.join(sys.argv[1], "s.npy"))  # 12 x 4000 float64: 384 kB
    except OSError as e:
        print("OSError:", e)
        sys.exit(3)
""")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fallocate", "zeros"])
def test_a_real_full_disk_is_an_oserror_not_sigbus(tmp_path, how):
    """Issue 13.5: a 256 kB tmpfs (mounted in a user namespace) cannot hold the 384 kB matrix;
    today's code dies of SIGBUS with no message."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k tmpfs {tmp_path}"], capture_output=True)
    if unshare is None or probe.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs unshare and user namespaces)")
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = f"mount -t tmpfs -o size=256k tmpfs {mnt} && exec {sys.executable} {script} {mnt} {how}"
    proc = subprocess.run([unshare, "-rm", "sh", "-c", cmd], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert "Cannot reserve 384128 bytes for" in proc.stdout and "s.npy.partial" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- item 7: one writer
def test_a_second_writer_of_one_score_file_is_refused_at_once(tmp_path, monkeypatch):
    model, train, test = worker.problem()
    est = worker.score_estimator(model, train)
    out = tmp_path / "s.npy"
    fd = held(str(out) + ".lock")
    try:
        monkeypatch.setattr(Scorer, "score_batch", lambda *a: pytest.fail("scored without the lock"))
        with pytest.raises(RunLockedError, match=r"The score file .*s\.npy is being written by another process \(pid/host 4242@elsewhere holds the lock .*s\.npy\.lock\).*write to another path"):
            est.pairwise_scores(test, train, out=out)
        assert os.listdir(tmp_path) == ["s.npy.lock"]  # the other run's files untouched
    finally:
        os.close(fd)
    monkeypatch.undo()
    mm = est.pairwise_scores(test, train, out=out)  # released: the next run proceeds
    np.testing.assert_array_equal(np.asarray(mm), est.pairwise_scores(test).numpy())
    assert os.listdir(tmp_path) == ["s.npy"]  # and removes its lock file


def test_a_second_fit_into_one_checkpoint_dir_is_refused(tmp_path):
    model, train, _ = worker.problem()
    fd = held(str(tmp_path / ".lock"))
    try:
        with pytest.raises(RunLockedError, match=r"The checkpoint directory .* is being written by another process"):
            worker.fit_estimator().fit(model, train, checkpoint_dir=tmp_path, checkpoint_every=2)
    finally:
        os.close(fd)
    assert isinstance(RunLockedError("x"), InfluenceError)
    worker.fit_estimator().fit(model, train, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert os.listdir(tmp_path) == []


def test_the_lock_is_released_on_errors(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with exclusive_lock(str(tmp_path / "x.lock"), "x"):
            1 / 0
    with exclusive_lock(str(tmp_path / "x.lock"), "x"):
        assert open(tmp_path / "x.lock").read().startswith(f"{os.getpid()}@")
    assert not (tmp_path / "x.lock").exists()


@pytest.mark.slow
def test_two_processes_writing_one_file(tmp_path):
    """Issue 13.7: two processes writing one out= path both ran; the file held another run's
    columns. Now the second fails at once and the first writes its own scores."""
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_resume_worker.py"), "score-wait", str(tmp_path), str(go)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "scores.npy.resume").exists():  # the worker holds the lock and is scoring
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        model, train, test = worker.problem()
        other = [(test[0][0] + 1, test[0][1])]
        with pytest.raises(RunLockedError, match=rf"pid/host {proc.pid}@"):
            worker.score_estimator(model, train).pairwise_scores(other, train, out=tmp_path / "scores.npy")
        go.touch()
        assert proc.wait(timeout=120) == 0, proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    est = worker.score_estimator(model, train)
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), est.pairwise_scores(test).numpy())
