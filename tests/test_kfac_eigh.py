"""K-FAC's factor eigendecompositions: exact on sparse factors (a 3×3 conv over 1×1 maps, as in a
ResNet-18's last stage at 32×32 inputs), the fallbacks when LAPACK fails, errors naming the layer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import zoo
from oracles import dense_fisher
from influence import EKFAC, KFAC, ClassificationTask, CurvatureError, FallbackWarning
from influence.curvature._eigh import factor_eigh

DT = torch.float64
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
REAL_EIGH = torch.linalg.eigh


def conv_over_1x1_maps(C=6, n=6):
    """``Conv2d(C, C, 3, padding=1)`` on ``(n, C, 1, 1)`` inputs with two dead channels: its
    ``A`` is ``(9C+1)²`` with ``C - 2 + 1`` rows that are not identically zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(C, 3)).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, C, 1, 1, generator=g, dtype=DT)
    x[:, :2] = 0
    return model, zoo.batches(x, torch.randint(0, 3, (n,), generator=g), 3)


def dense(cur):
    return cur.matmat(torch.eye(cur.layout_.num_params, dtype=DT), damping=0.0)


def fit(cls, model, loader):
    return cls(damping=1e-2, fisher_type="empirical").fit(model, ClassificationTask(), loader)


def test_sparse_conv_factor_eigendecomposition_is_exact():
    model, loader = conv_over_1x1_maps()
    cur = fit(KFAC, model, loader)
    stats, block = cur.statistics_, cur.blocks_[0]
    assert block.info.name == "0"
    A = stats["0/A"] / stats["0/A_count"]
    assert A.shape == (55, 55) and int(A.ne(0).any(0).sum()) == 5  # C = 6: 4 live channels + bias
    Q = block.Q_A
    torch.testing.assert_close(Q.T @ Q, torch.eye(55, dtype=DT), rtol=0, atol=1e-12)
    lam_A = torch.diagonal(Q.T @ A @ Q)
    torch.testing.assert_close(Q @ torch.diag(lam_A) @ Q.T, A, rtol=0, atol=1e-12)
    assert int((lam_A == 0).sum()) >= 50  # the dead coordinates: exact zeros
    S = stats["0/S"] / stats["0/S_count"]
    lam_S = torch.diagonal(block.Q_S.T @ S @ block.Q_S)
    torch.testing.assert_close(block.eigenvalues, torch.outer(lam_S, lam_A).clamp_min(0), rtol=1e-10, atol=1e-14)
    V = torch.randn(3, cur.layout_.num_params, dtype=DT)
    torch.testing.assert_close(cur.solve(cur.matmat(V)), V)
    # dense oracles: each layer's block is exact for one example (one location per example),
    # EK-FAC is closer for six
    x1, y1 = loader[0][0][:1], loader[0][1][:1]
    K, F1 = dense(fit(KFAC, model, [(x1, y1)])), dense_fisher(model, ClassificationTask(), [(x1, y1)])
    conv, head = slice(0, 6 * 6 * 9 + 6), slice(6 * 6 * 9 + 6, K.shape[0])
    for layer in (conv, head):
        torch.testing.assert_close(K[layer, layer], F1[layer, layer], rtol=1e-10, atol=1e-13)
    assert int(K[conv, head].count_nonzero()) == 0
    F = dense_fisher(model, ClassificationTask(), loader)
    assert (dense(fit(EKFAC, model, loader)) - F).norm() < (dense(cur) - F).norm()


def picky_eigh(M, *args, **kwargs):
    """``torch.linalg.eigh`` that fails to converge on a matrix with an identically zero row,
    as LAPACK did on a ResNet-18's 4,608-wide conv factor (error code 20104224)."""
    if M.shape[0] and bool(M.eq(0).all(dim=0).any()):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (error code: 20104224)")
    return REAL_EIGH(M, *args, **kwargs)


def test_factors_with_zero_rows_are_decomposed_on_their_non_zero_block(monkeypatch):
    # failed before: the full sparse factor went to eigh, which raised without naming the layer
    model, loader = conv_over_1x1_maps()
    reference = dense(fit(EKFAC, model, loader))
    monkeypatch.setattr(torch.linalg, "eigh", picky_eigh)
    torch.testing.assert_close(dense(fit(EKFAC, model, loader)), reference, rtol=1e-12, atol=1e-14)


def test_a_failing_eigh_is_retried_with_a_shift_then_by_scipy(monkeypatch):
    model, loader = conv_over_1x1_maps()
    reference = dense(fit(KFAC, model, loader))
    failures = []

    def fails_once(M, *args, **kwargs):
        if not failures:
            failures.append(M.shape)
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return REAL_EIGH(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fails_once)
    torch.testing.assert_close(dense(fit(KFAC, model, loader)), reference, rtol=1e-8, atol=1e-12)
    assert failures  # the shifted retry ran

    drivers = []
    real_scipy = scipy.linalg.eigh

    def always_fails(M, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    monkeypatch.setattr(scipy.linalg, "eigh", lambda M, driver: drivers.append(driver) or real_scipy(M, driver=driver))
    torch.testing.assert_close(dense(fit(KFAC, model, loader)), reference, rtol=1e-10, atol=1e-12)
    assert set(drivers) == {"evr"}


def test_an_eigendecomposition_that_cannot_be_done_names_the_layer_and_factor(monkeypatch):
    model, loader = conv_over_1x1_maps()

    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    def scipy_fails(*args, **kwargs):
        raise np.linalg.LinAlgError("the eigenvectors failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    monkeypatch.setattr(scipy.linalg, "eigh", scipy_fails)
    message = (
        r"Could not eigendecompose the S factor \(6×6; 6 rows not identically zero\) of layer '0': "
        r"torch.linalg.eigh: .*diagonal shift.*driver='evr'.*driver='ev'.*params="
    )
    with pytest.raises(CurvatureError, match=message):
        fit(KFAC, model, loader)


def test_a_non_finite_factor_is_named():
    model, loader = conv_over_1x1_maps()
    cur = fit(KFAC, model, loader)
    bad = {k: v.clone() for k, v in cur.statistics_.items()}
    bad["0/A"][5, 5] = float("nan")  # e.g. a corrupted shard passed to merge_statistics
    with pytest.raises(CurvatureError, match=r"The A factor \(55×55\) of layer '0' has NaN or inf entries"):
        cur.merge_statistics(bad)


def test_factor_eigh_embeds_the_null_space_exactly():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(4, 3, generator=g, dtype=DT)
    M = torch.zeros(7, 7, dtype=DT)
    live = torch.tensor([1, 4, 5, 6])
    M[live[:, None], live] = B @ B.T  # rank 3 on 4 live coordinates
    values, vectors = factor_eigh(M, "layer", "A")
    assert values.tolist()[:3] == [0.0, 0.0, 0.0] and bool((values >= 0).all())
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(7, dtype=DT), rtol=0, atol=1e-14)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, M, rtol=0, atol=1e-13)
    torch.testing.assert_close(values[3:], REAL_EIGH(B @ B.T)[0].clamp_min(0), rtol=0, atol=1e-13)
    assert factor_eigh(torch.zeros(3, 3, dtype=DT), "l", "S")[0].tolist() == [0.0, 0.0, 0.0]


def test_kfac_on_a_narrow_resnet18_at_32x32(monkeypatch):
    """A ResNet-18-shaped model (torchvision's layout, widths 4-16) at 32×32: the last stage's
    3×3 convolutions see 1×1 maps. Every conv and the head get Kronecker blocks (BatchNorm falls
    back, here to the identity: the diagonal's vmap warm-up would dominate), the sparse factors are decomposed on their live rows (an eigh
    that fails on zero rows is never reached with them), and solve inverts matmat."""
    monkeypatch.syspath_prepend(str(BENCH))
    from _common import ResNet18

    torch.manual_seed(0)
    model = ResNet18(widths=(4, 8, 8, 16), classes=3).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(3, 3, 32, 32, generator=g, dtype=DT), torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]
    monkeypatch.setattr(torch.linalg, "eigh", picky_eigh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        cur = KFAC(damping=1e-2, fallback="identity").fit(model, ClassificationTask(), loader)
    methods = {name: entry["method"] for name, entry in cur.coverage_.items()}
    assert all(m == "kronecker" for name, m in methods.items() if "conv" in name or "downsample.0" in name or name == "fc")
    assert all(m == "identity" for name, m in methods.items() if "bn" in name or "downsample.1" in name)
    A = cur.statistics_["layer4.1.conv1/A"]
    assert A.shape == (144, 144) and int(A.ne(0).any(0).sum()) <= 16  # centre taps only
    V = torch.randn(2, cur.layout_.num_params, dtype=DT)
    torch.testing.assert_close(cur.solve(cur.matmat(V)), V)
