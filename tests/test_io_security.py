"""Saved files are untrusted input, and writes must not damage anything (issue 13).

Names introduced by the fix are imported inside the tests that use them, so that this file also
runs against the code before the fix and each test there fails for its own reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import warnings

import pytest
import torch

from influence import ClassificationTask, Curvature, Exact, InfluenceEstimator, ScoringConfig
from influence.io import CorruptedFileError, StorageError, load_tensors, save_tensors
from test_io import small

HERE = os.path.dirname(__file__)
DT = torch.float64


@pytest.fixture(scope="module")
def fitted():
    model, train = small()
    est = InfluenceEstimator(Exact(damping=0.01, curvature_type="ggn"), ClassificationTask("margin"), score_dtype=DT)
    return est.fit(model, train), model, train


@pytest.fixture
def saved(fitted, tmp_path):
    path = tmp_path / "est.safetensors"
    fitted[0].save(path)
    return path


@pytest.fixture
def registry(monkeypatch):
    """Registrations made in a test are dropped after it."""
    try:
        from influence import _registry
    except ImportError:  # the code before the fix has no registry
        return None
    monkeypatch.setattr(_registry, "_USER", {})
    return _registry


def checksum(meta):
    """The documented metadata checksum, written out independently of the library."""
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def rewrite(path, edit_meta=None, edit_raw=None, edit_header=None, resign=True):
    """Rewrites a saved file's header like an attacker or a hand edit would; with ``resign``
    the metadata checksum is recomputed (anyone can: it is not a signature)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    raw = header["__metadata__"]["influence"]
    if edit_meta is not None:
        meta = json.loads(raw)
        edit_meta(meta)
        if resign:
            meta["checksum"] = checksum(meta)
        raw = json.dumps(meta)
    if edit_raw is not None:
        raw = edit_raw(raw)
    header["__metadata__"]["influence"] = raw
    if edit_header is not None:
        edit_header(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


# ------------------------------------------------------------------ 1. no code from files
BAIT = {"class": "_io_bait:bait", "repr": "bait()", "params": {"command": "id"}}


@pytest.mark.parametrize("where", ["task", "curvature", "nested"])
def test_crafted_class_in_metadata_is_never_imported_nor_called(saved, fitted, where):
    """The issue's ``"task": {"class": "os:system", ...}``, with a counting callable instead,
    and the checksum recomputed: the allow-list alone stops it, before any import."""
    _, model, _ = fitted

    def plant(meta):
        if where == "nested":  # a nested object in the estimator's parameters
            meta["estimator"]["params"]["scoring"] = {"__object__": BAIT}
        else:
            meta[where] = BAIT

    rewrite(saved, plant)
    sys.modules.pop("_io_bait", None)
    task = ClassificationTask("margin") if where != "task" else None  # passing task= does not help
    with pytest.raises(StorageError, match=r"'_io_bait:bait', which is neither one of influence's classes nor registered"):
        InfluenceEstimator.load(saved, model, task=task)
    assert "_io_bait" not in sys.modules  # not even imported
    import _io_bait

    assert _io_bait.CALLS == []


def test_os_system_in_metadata_does_not_run(saved, fitted, tmp_path):
    marker = tmp_path / "pwned"
    rewrite(saved, lambda m: m.update(task={"class": "os:system", "repr": "x", "params": {"command": f"touch {marker}"}}))
    with pytest.raises(StorageError, match=r"names class 'os:system'.*register_class\(system\).*Pass task="):
        InfluenceEstimator.load(saved, fitted[1])
    assert not marker.exists()


def test_dtype_names_decode_only_to_real_dtypes(saved, fitted):
    rewrite(saved, lambda m: m["estimator"]["params"].update(score_dtype={"__dtype__": "load"}))
    with pytest.raises(StorageError, match="unknown torch dtype 'load'"):
        InfluenceEstimator.load(saved, fitted[1])  # before: score_dtype=torch.load, a callable


def test_state_metadata_sets_only_fitted_attributes(saved, fitted):
    rewrite(saved, lambda m: m["curvature_state"].update(damping=5.0))  # before: silently damping 5
    with pytest.raises(CorruptedFileError, match=r"does not fit Exact.*names 'damping', not a fitted attribute"):
        InfluenceEstimator.load(saved, fitted[1])


class ScaledMarginTask(ClassificationTask):
    """A user's task with a constructor argument."""

    def __init__(self, scale=1.0):
        super().__init__("margin")
        self.scale = scale

    def measurement(self, model, batch):
        return super().measurement(model, batch) * self.scale


def test_custom_task_needs_registration_or_an_instance(tmp_path, registry):
    model, train = small()
    est = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), ScaledMarginTask(3.0), score_dtype=DT).fit(model, train)
    est.save(tmp_path / "e.safetensors")
    with pytest.raises(StorageError, match=r"register_class\(ScaledMarginTask\) before loading\. Pass task=\.\.\. to load\(\)"):
        InfluenceEstimator.load(tmp_path / "e.safetensors", model)
    given = InfluenceEstimator.load(tmp_path / "e.safetensors", model, task=ScaledMarginTask(3.0))
    from influence import register_class

    assert register_class(ScaledMarginTask) is ScaledMarginTask  # usable as a decorator
    loaded = InfluenceEstimator.load(tmp_path / "e.safetensors", model)
    assert type(loaded.task_) is ScaledMarginTask and loaded.task_.scale == 3.0
    expected = est.pairwise_scores(train[:1])
    for other in (loaded, given):
        torch.testing.assert_close(other.pairwise_scores(train[:1], train), expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"register_class takes a class, e\.g\. register_class\(MyTask\)"):
        register_class(ScaledMarginTask(1.0))


class Rescaled(Curvature):
    """A user's curvature: ``scale·I`` (fitted state: a scalar tensor)."""

    def __init__(self, damping=0.1, scale=2.0):
        super().__init__(damping)
        self.scale = scale

    def _fit(self, model, task, loader, layout):
        self.scale_ = torch.tensor(float(self.scale), dtype=DT)

    def _solve(self, G, damping):
        return G / (self.scale_.to(G) + damping)

    def _matmat(self, V, damping):
        return V * (self.scale_.to(V) + damping)


def test_custom_curvature_is_allowed_by_an_instance_with_the_saved_parameters(tmp_path, registry):
    model, train = small()
    est = InfluenceEstimator(Rescaled(scale=3.0), ClassificationTask(), score_dtype=DT).fit(model, train)
    path = tmp_path / "c.safetensors"
    est.save(path)
    with pytest.raises(StorageError, match=r"register_class\(Rescaled\).*Pass curvature=<an instance"):
        InfluenceEstimator.load(path, model)
    loaded = InfluenceEstimator.load(path, model, curvature=Rescaled(scale=3.0))
    assert type(loaded.curvature_) is Rescaled and float(loaded.curvature_.scale_) == 3.0
    torch.testing.assert_close(loaded.pairwise_scores(train[:1], train), est.pairwise_scores(train[:1]), rtol=0, atol=0)
    with pytest.raises(StorageError, match=r"curvature=Rescaled\(damping=0.1, scale=5.0\) differs from the saved Rescaled\(damping=0.1, scale=3.0\)"):
        InfluenceEstimator.load(path, model, curvature=Rescaled(scale=5.0))
    with pytest.raises(StorageError, match=r"holds a .*:Rescaled curvature, but curvature= is a influence.curvature.exact:Exact"):
        InfluenceEstimator.load(path, model, curvature=Exact())


def test_allowed_nested_objects_round_trip(tmp_path):
    model, train = small()
    config = ScoringConfig(strategy="factored", seed=3)
    est = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), ClassificationTask(), score_dtype=DT, scoring=config).fit(model, train)
    est.save(tmp_path / "e.safetensors")
    loaded = InfluenceEstimator.load(tmp_path / "e.safetensors", model)
    assert repr(loaded.scoring) == repr(config) and loaded.score_dtype is DT


# ------------------------------------------------------------------ 1. integrity of the metadata
@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["curvature"]["params"].update(damping=0.09),  # was 0.01: scores off by ~3.5
        lambda m: m.update(num_train=7),
        lambda m: m["curvature"]["params"].update(curvature_type="hessian"),
        lambda m: m["curvature"].update({"class": "influence.curvature.diagonal:Diagonal"}),
    ],
    ids=["damping", "num_train", "curvature_type", "class"],
)
def test_edited_metadata_fails_the_checksum(saved, fitted, edit):
    rewrite(saved, edit, resign=False)
    with pytest.raises(CorruptedFileError, match="metadata does not match its checksum"):
        InfluenceEstimator.load(saved, fitted[1])


def test_reshaped_tensor_fails_its_checksum(saved, fitted):
    def reshape(header):
        header["curvature/matrix_"]["shape"] = [40, 10]  # the same 400 float64s as a 20 x 20

    rewrite(saved, edit_header=reshape)
    with pytest.raises(CorruptedFileError, match=r"contents of \['curvature/matrix_'\] do not match their checksums"):
        InfluenceEstimator.load(saved, fitted[1])


def test_malformed_metadata_json_is_a_corrupted_file(saved, fitted):
    rewrite(saved, edit_raw=lambda raw: raw[:-5])
    with pytest.raises(CorruptedFileError, match="corrupted metadata \\(not valid JSON"):
        InfluenceEstimator.load(saved, fitted[1])
    rewrite(saved, edit_raw=lambda raw: "[1, 2]")
    with pytest.raises(CorruptedFileError, match="a JSON list, not an object"):
        InfluenceEstimator.load(saved, fitted[1])


@pytest.mark.parametrize("version", [0, -1, True, None, "2", 1.5])
def test_format_version_must_be_a_positive_integer(saved, fitted, version):
    def edit(meta):
        if version is None:
            del meta["format_version"]
        else:
            meta["format_version"] = version

    rewrite(saved, edit)
    with pytest.raises(CorruptedFileError, match=f"format_version is {version!r}, not a positive integer"):
        InfluenceEstimator.load(saved, fitted[1])


@pytest.mark.parametrize(
    "params, match",
    [
        (None, r"influence.curvature.diagonal:Diagonal takes no arguments \['curvature_type'"),
        ({"damping": 0.01}, r"The curvature state saved in .* does not fit Diagonal, the class its metadata names"),
    ],
)
def test_changed_class_with_a_recomputed_checksum_is_a_clear_error(saved, fitted, params, match):
    def edit(meta):
        meta["curvature"]["class"] = "influence.curvature.diagonal:Diagonal"
        if params is not None:
            meta["curvature"]["params"] = params

    rewrite(saved, edit)
    with pytest.raises(StorageError, match=match):  # before: KeyError: 'diagonal/sum'
        InfluenceEstimator.load(saved, fitted[1])


def test_version_1_files_load_with_a_warning(saved, fitted, tmp_path):
    """A file in the previous format: no metadata checksum, per-tensor SHA-256 of the bytes."""
    est, model, train = fitted

    def downgrade(meta):
        del meta["checksum"]
        meta["format_version"] = 1
        for name, t in load_tensors(saved, "estimator")[0].items():
            meta["checksums"][name] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()

    rewrite(saved, downgrade, resign=False)
    with pytest.warns(UserWarning, match="format version 1, whose metadata .* is not covered by a checksum.*save it again"):
        loaded = InfluenceEstimator.load(saved, model)
    torch.testing.assert_close(loaded.pairwise_scores(train, train), est.pairwise_scores(train), rtol=0, atol=0)
    loaded.save(tmp_path / "upgraded.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tensors(tmp_path / "upgraded.safetensors", "estimator")[1]["format_version"] == 2


# ------------------------------------------------------------------ 2. what a write may replace
def test_save_refuses_fifos_links_and_directories(fitted, tmp_path):
    est = fitted[0]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link, dangling = tmp_path / "link.safetensors", tmp_path / "dangling.safetensors"
    link.symlink_to(victim)
    dangling.symlink_to(tmp_path / "nowhere")
    (tmp_path / "dir").mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(StorageError, match=r"pipe is a FIFO \(named pipe\), not a regular file: refusing to replace it\."):
        est.save(fifo)
    with pytest.raises(StorageError, match=r"link.safetensors is a symbolic link \(to .*victim.txt\): influence does not write through links\. Save to .*victim.txt"):
        est.save(link)
    with pytest.raises(StorageError, match=r"dangling.safetensors is a symbolic link"):
        est.save(dangling)
    with pytest.raises(StorageError, match=r"dir is a directory, not a regular file: refusing to replace it; pass a file path, e\.g\. .*dir/estimator.safetensors"):
        est.save(tmp_path / "dir")
    assert sorted(os.listdir(tmp_path)) == before and not os.listdir(tmp_path / "dir")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link) and victim.read_text() == "keep me"


def test_scores_file_refuses_links(fitted, tmp_path):
    est, _, train = fitted
    victim = tmp_path / "victim.npy"
    victim.write_bytes(b"keep me")
    (tmp_path / "scores.npy").symlink_to(victim)
    with pytest.raises(StorageError, match=r"scores.npy is a symbolic link"):
        est.pairwise_scores(train[:1], train, out=str(tmp_path / "scores.npy"))
    assert os.path.islink(tmp_path / "scores.npy") and victim.read_bytes() == b"keep me"


def test_devices_are_refused_before_any_write():
    from influence._atomic import check_target

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(StorageError, match="/dev/full is a character device, not a regular file"):
        check_target("/dev/full")
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


def test_load_refuses_directories_and_fifos_without_hanging(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    model = small()[0]
    (tmp_path / "dir").mkdir()
    with pytest.raises(StorageError, match=r"dir is a directory, not an influence file"):
        InfluenceEstimator.load(tmp_path / "dir", model)

    def hung(signum, frame):
        raise TimeoutError("load() blocked reading a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(StorageError, match=r"pipe is a FIFO \(named pipe\), not an influence file"):
            InfluenceEstimator.load(fifo, model)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ 3. fsync of the kept file
def test_fsync_reaches_the_kept_file_before_the_rename_and_the_directory_after(fitted, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, stat.S_ISDIR(info.st_mode)))
        return real_fsync(fd)

    def replace(source, target):
        events.append(("replace", None, None))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o600)
    fitted[0].save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # a replaced file keeps its permissions
    kept, directory = os.stat(path).st_ino, os.stat(tmp_path).st_ino
    assert ("fsync", kept, False) in events, f"the kept inode {kept} was never fsynced: {events}"
    assert events.index(("fsync", kept, False)) < events.index(("replace", None, None)) < events.index(("fsync", directory, True))


def test_streamed_files_are_plain_safetensors_for_every_dtype(tmp_path):
    from safetensors.torch import load_file

    a = torch.arange(20.0).reshape(4, 5)
    tensors = {"row": a[1], "col": a[:, 1], "all": a, "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(3), "bf16": torch.full((3,), 1.5, dtype=torch.bfloat16),
               "f16": torch.ones(2, dtype=torch.float16), "i8": torch.tensor([-1, 7], dtype=torch.int8)}
    save_tensors(tmp_path / "t.safetensors", tensors, {"kind": "test"})
    for loaded in (load_tensors(tmp_path / "t.safetensors", "test")[0], load_file(str(tmp_path / "t.safetensors"))):
        assert sorted(loaded) == sorted(tensors)
        for name, t in tensors.items():
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


# ------------------------------------------------------------------ 4. temporary files of killed writers
@pytest.mark.slow
def test_temporary_file_of_a_killed_save_is_swept_by_the_next_save(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    worker = subprocess.Popen([sys.executable, os.path.join(HERE, "_io_kill_worker.py"), str(tmp_path / "a.safetensors")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "written", worker.stderr.read()
        sizes = {name: os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)}
        assert sizes and max(sizes.values()) > 800_000, sizes  # the full file, under a temporary name
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)
    save_tensors(tmp_path / "b.safetensors", {"y": torch.zeros(3)}, {"kind": "test"})
    assert os.listdir(tmp_path) == ["b.safetensors"]


def test_sweep_removes_only_stale_unlocked_temporary_files_of_influence(tmp_path):
    from influence import _atomic

    def temp(name, pid=None, host=None, age=0.0):
        path = _atomic.temp_name(str(tmp_path / name))
        head, tail = os.path.split(path)
        parts = tail.split("-", 5)  # ['.influence', 'tmp', pid, random, host, name]
        parts[2] = str(pid if pid is not None else os.getpid())
        parts[4] = host or parts[4]
        path = os.path.join(head, "-".join(parts))
        with open(path, "wb") as f:
            f.write(b"x")
        if age:
            os.utime(path, (time.time() - age, time.time() - age))
        return os.path.basename(path)

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    gone = [temp("mine-not-in-progress"), temp("dead-writer", pid=dead_pid), temp("idle-other-host", host="0badc0de", age=7200),
            temp("impossible-pid", pid=10**30)]
    kept = [temp("live-writer", pid=os.getppid()), temp("fresh-other-host", host="0badc0de"), temp("dead-but-locked", pid=dead_pid)]
    for name in (".tmp-abc", ".influence-tmp-garbage", "x.safetensors"):  # not ours, or not our pattern
        (tmp_path / name).write_bytes(b"y")
        kept.append(name)
    link = temp("link")
    os.unlink(tmp_path / link)
    os.symlink(tmp_path / "x.safetensors", tmp_path / link)
    kept.append(link)
    locked = open(tmp_path / kept[2], "rb")
    fcntl.flock(locked.fileno(), fcntl.LOCK_EX)  # a writer that is still writing
    try:
        _atomic.atomic_write(tmp_path / "new.bin", lambda f: f.write(b"new"))
    finally:
        locked.close()
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["new.bin"])
    assert (tmp_path / "x.safetensors").read_bytes() == b"y"
