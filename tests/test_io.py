"""Saving and loading estimators: round trips, model mismatches, corruption, versions."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from influence import ClassificationTask, Curvature, Exact, Identity, InfluenceEstimator
from influence.io import (
    CorruptedFileError,
    FormatVersionError,
    ModelMismatchError,
    StorageError,
    atomic_write,
    load_tensors,
    save_tensors,
)
from zoo import batches, classification_data, mlp


def small():
    model = mlp(d_in=3, hidden=(3,), d_out=2, seed=0)
    x, y = classification_data(n=6, d_in=3, classes=2, seed=1)
    return model, batches(x, y, 4)


@pytest.fixture(scope="module")
def fitted():
    model, train = small()
    est = InfluenceEstimator(Exact(damping=0.1, curvature_type="ggn"), ClassificationTask("margin"), score_dtype=torch.float64)
    return est.fit(model, train), model, train


@pytest.mark.parametrize("curvature", [Exact(damping=0.1, curvature_type="ggn"), Identity(damping=2.0)])
def test_round_trip_gives_identical_scores(tmp_path, curvature):
    model, train = small()
    est = InfluenceEstimator(curvature, ClassificationTask("margin"), score_dtype=torch.float64, chunk_size=3).fit(model, train)
    est.save(tmp_path / "est.safetensors")
    loaded = InfluenceEstimator.load(tmp_path / "est.safetensors", model)
    assert repr(loaded) == repr(est)
    assert loaded.num_train_ == 6 and loaded.layout_ == est.layout_
    torch.testing.assert_close(loaded.pairwise_scores(train, train), est.pairwise_scores(train), rtol=0, atol=0)
    assert os.listdir(tmp_path) == ["est.safetensors"]  # no temporary files left
    with pytest.raises(ValueError, match="pass train_loader"):
        loaded.self_scores()


def test_metadata_records_versions_curvature_task_layout(fitted, tmp_path):
    from influence.io import metadata_checksum

    est, model, _ = fitted
    est.save(tmp_path / "e.safetensors")
    tensors, meta = load_tensors(tmp_path / "e.safetensors", "estimator")
    assert meta["format_version"] == 2 and meta["library_version"]
    assert meta["checksum"] == metadata_checksum(meta)
    assert meta["curvature"]["class"] == "influence.curvature.exact:Exact"
    assert meta["curvature"]["params"]["curvature_type"] == "ggn"
    assert meta["task"]["repr"] == "ClassificationTask(measurement='margin')"
    assert meta["layout"]["names"] == list(est.layout_.names)
    assert set(meta["model"]) == {n for n, _ in model.named_parameters()}
    assert set(tensors) == {"curvature/matrix_"}


def test_loading_against_other_weights_names_the_parameter(fitted, tmp_path):
    est, model, _ = fitted
    est.save(tmp_path / "e.safetensors")
    other = mlp(d_in=3, hidden=(3,), d_out=2, seed=0)
    with torch.no_grad():
        other[2].bias.add_(1e-3)
    with pytest.raises(ModelMismatchError, match=r"different values in \['2.bias'\]"):
        InfluenceEstimator.load(tmp_path / "e.safetensors", other)
    with pytest.raises(ModelMismatchError, match=r"different shapes \(0.weight: saved \[3, 3\], model \[4, 3\]"):
        InfluenceEstimator.load(tmp_path / "e.safetensors", mlp(d_in=3, hidden=(4,), d_out=2))
    with pytest.raises(ModelMismatchError, match=r"missing parameters \['2.weight', '2.bias'\]"):
        InfluenceEstimator.load(tmp_path / "e.safetensors", torch.nn.Sequential(model[0]))


def test_truncated_file_is_detected(fitted, tmp_path):
    est, _, _ = fitted
    path = tmp_path / "e.safetensors"
    est.save(path)
    data = path.read_bytes()
    for cut in (len(data) - 7, 100, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptedFileError, match="truncated"):
            InfluenceEstimator.load(path, fitted[1])


def test_corrupted_bytes_fail_the_checksum(fitted, tmp_path):
    est, _, _ = fitted
    path = tmp_path / "e.safetensors"
    est.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptedFileError, match=r"curvature/matrix_.*do not match their checksums"):
        InfluenceEstimator.load(path, fitted[1])


def test_newer_format_version_is_refused(tmp_path):
    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {"kind": "estimator"})
    data = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["influence"])
    meta["format_version"] = 99
    header["__metadata__"]["influence"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(FormatVersionError, match="format version 99.*newer than this version's 2. Upgrade"):
        load_tensors(tmp_path / "x.safetensors", "estimator")


def test_other_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StorageError, match="without influence metadata"):
        load_tensors(tmp_path / "plain.safetensors", "estimator")
    save_tensors(tmp_path / "c.safetensors", {}, {"kind": "fit-checkpoint"})
    with pytest.raises(StorageError, match="holds a 'fit-checkpoint', not a 'estimator'"):
        load_tensors(tmp_path / "c.safetensors", "estimator")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_save_before_fit_and_custom_task_messages(tmp_path, fitted):
    from influence import NotFittedError
    from influence.tasks import Task

    with pytest.raises(NotFittedError, match=r"call fit\(...\) before save\(\)"):
        InfluenceEstimator().save(tmp_path / "x.safetensors")

    class MyTask(Task):
        def __init__(self, scale):
            self._scale = scale

        def loss(self, model, batch):
            return ClassificationTask().loss(model, batch) * self._scale

    model, train = small()
    est = InfluenceEstimator(Identity(), MyTask(2.0)).fit(model, train)
    est.save(tmp_path / "m.safetensors")
    with pytest.raises(StorageError, match=r"Cannot rebuild MyTask\(\).*Pass task=\.\.\. to load"):
        InfluenceEstimator.load(tmp_path / "m.safetensors", model)
    loaded = InfluenceEstimator.load(tmp_path / "m.safetensors", model, task=MyTask(2.0))
    torch.testing.assert_close(loaded.self_scores(train), est.self_scores())


class ScaledIdentity(Curvature):
    """A custom curvature with tensor, dict-of-tensor and scalar fitted state."""

    def __init__(self, damping=1.0, scale=2.0):
        super().__init__(damping)
        self.scale = scale

    def _fit(self, model, task, loader, layout):
        self.diag_ = torch.full((layout.num_params,), self.scale, dtype=torch.float64)
        self.parts_ = {"a": torch.ones(2), "b": torch.zeros(3, dtype=torch.int64)}
        self.note_ = "fitted"
        self.sizes_ = [1, 2]

    def _solve(self, G, damping):
        return G / (self.diag_.to(G) + damping)

    def _matmat(self, V, damping):
        return V * (self.diag_.to(V) + damping)


def test_generic_state_export_round_trips_a_custom_curvature(tmp_path, monkeypatch):
    from influence import _registry

    monkeypatch.setattr(_registry, "_USER", {})  # leaves no registration behind
    _registry.register_class(ScaledIdentity)  # a custom class must be allowed to be rebuilt
    model, train = small()
    est = InfluenceEstimator(ScaledIdentity(scale=3.0), ClassificationTask(), score_dtype=torch.float64).fit(model, train)
    est.save(tmp_path / "c.safetensors")
    loaded = InfluenceEstimator.load(tmp_path / "c.safetensors", model)
    cur = loaded.curvature_
    assert cur.scale == 3.0 and cur.note_ == "fitted" and cur.sizes_ == [1, 2]
    assert torch.equal(cur.diag_, est.curvature_.diag_) and torch.equal(cur.parts_["b"], est.curvature_.parts_["b"])
    torch.testing.assert_close(loaded.pairwise_scores(train, train), est.pairwise_scores(train), rtol=0, atol=0)

    est.curvature_.blocks_ = [object()]
    with pytest.raises(NotImplementedError, match=r"ScaledIdentity.blocks_ is a list: override _state_tensors, _state_metadata and _load_state"):
        est.save(tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()
