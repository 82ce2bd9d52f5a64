"""``diagnose_scores`` on matrices with known answers, ``load_scores`` round trips, and
``diagnose`` reusing ``diagnose_scores``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import influence
from influence import Identity, InfluenceEstimator, diagnose, diagnose_scores, load_scores
from influence.evaluation import cover, roc_auc, top1_accuracy
from zoo import DT, batches

N_TEST, N_TRAIN, HUB = 30, 20, 7


def planted_hub(seed=0):
    """Scores in [0, 1); #7 scores 2 for queries 0..23; query 24 + m has #m (m < 6) at 1.5."""
    S = np.random.default_rng(seed).random((N_TEST, N_TRAIN))
    S[:24, HUB] = 2.0
    for m in range(6):
        S[24 + m, m] = 1.5
    return S


def labels_with_hub_agreeing(n_agree: int):
    """Train labels cycle 0, 1, 2 (#7 has label 1); the first ``n_agree`` queries #7 dominates
    have label 1, the rest label 0 or 2."""
    train = np.arange(N_TRAIN) % 3
    test = np.array([1] * n_agree + [0, 2] * 15)[:N_TEST]
    return train, test


def test_planted_hub_is_found_with_its_concentration():
    report = diagnose_scores(planted_hub())
    assert report.dominance == {"index": HUB, "count": 24, "share": 0.8, "top": [[HUB, 24], [0, 1], [1, 1], [2, 1], [3, 1]],
                                "distinct_top1": 7, "tied_top1": 0}
    c = report.concentration
    assert c["distinct_top1"] == 7 and c["top5_share"] == pytest.approx(28 / 30)
    assert c["effective_top1"] == pytest.approx(math.exp(-(0.8 * math.log(0.8) + 6 / 30 * math.log(1 / 30))))
    assert c["chance_distinct_top1"] == pytest.approx(N_TRAIN * (1 - (1 - 1 / N_TRAIN) ** N_TEST))
    assert [row["index"] for row in report.dominant] == [HUB] and report.dominant[0]["flagged"]
    assert len(report.flags) == 1
    assert report.flags[0].startswith("dominant example: training example #7 is top-1 for 24 of 30 queries (80% >= 20%)")
    assert report.class_metrics is None and report.correlations == {}
    assert "- #7 is top-1 for 24 of 30 queries (80%)" in str(report)


def test_a_hub_without_the_queries_label_is_flagged():
    train, test = labels_with_hub_agreeing(3)
    report = diagnose_scores(planted_hub(), train, test)
    row = report.dominant[0]
    assert row["label"] == 1 and row["same_label_share"] == pytest.approx(3 / 24) and row["flagged"]
    assert "only 12% of them have its label (1)" in report.flags[0]


@pytest.mark.parametrize("n_agree, flagged", [(24, False), (13, False), (12, True)])
def test_a_correct_answer_is_not_a_hub(n_agree, flagged):
    """Flagged only unless *most* (more than half) of the dominated queries share its label."""
    train, test = labels_with_hub_agreeing(n_agree)
    report = diagnose_scores(planted_hub(), [f"class {y}" for y in train], [f"class {y}" for y in test])
    row = report.dominant[0]
    assert row["index"] == HUB and row["same_label_share"] == pytest.approx(n_agree / 24)
    assert row["flagged"] is flagged and row["label"] == "class 1"
    assert any(f.startswith("dominant example") for f in report.flags) is flagged
    assert ("| #7 | 24 of 30 (80%) |" in str(report)) and str(report).rstrip().endswith(
        "### Flags: none" if not flagged else "RepresentationSimilarity.")


def test_class_metrics_are_the_evaluation_functions_and_string_labels_equal_ints():
    S = planted_hub(1)
    train, test = labels_with_hub_agreeing(10)
    as_int = diagnose_scores(S, train, test).class_metrics
    as_str = diagnose_scores(torch.tensor(S), [["x", "y", "z"][y] for y in train], [["x", "y", "z"][y] for y in test])
    assert as_int == as_str.class_metrics
    same = test[:, None] == train[None, :]
    assert as_int["acc"] == top1_accuracy(S, train, test)
    assert as_int["cover"] == cover(S, train, test) and as_int["cover_k"] == N_TRAIN // 3 == 6
    assert as_int["auc"] == roc_auc(S, same) and as_int["auc_queries"] == N_TEST
    chance = np.mean([np.mean(train == y) for y in test])  # 7/20 for class 0 and 1, 6/20 for 2
    assert as_int["chance_acc"] == as_int["chance_cover"] == pytest.approx(chance) and as_int["chance_auc"] == 0.5
    assert as_int["n_classes"] == 3
    assert diagnose_scores(S, train, test, cover_k=2).class_metrics["cover"] == cover(S, train, test, k=2)


def test_auc_skips_queries_whose_class_is_not_in_the_training_set():
    S = planted_hub(2)
    train, test = labels_with_hub_agreeing(5)
    test = test.copy()
    test[:4] = 9  # unseen class: AUC undefined for these queries
    m = diagnose_scores(S, train, test).class_metrics
    assert m["auc_queries"] == N_TEST - 4
    assert m["auc"] == roc_auc(S[4:], test[4:, None] == train[None, :])


def test_influence_that_follows_length_is_flagged():
    rng = np.random.default_rng(3)
    lengths = rng.permutation(np.arange(5, 5 + N_TRAIN)).astype(float)
    norms = rng.random(N_TRAIN)
    S = -lengths[None, :] + 0.1 * rng.standard_normal((N_TEST, N_TRAIN))  # shorter = more helpful
    report = diagnose_scores(S, train_lengths=lengths, train_grad_norms=norms)
    length = report.correlations["length"]
    assert length["mean_score"] == pytest.approx(-1.0) and length["mean_score_p"] < 1e-10
    assert length["top1_count"] < -0.3  # every query's top-1 is the shortest example
    assert abs(report.correlations["grad_norm"]["mean_score"]) < 0.5
    shortest = int(np.argmin(lengths))
    assert report.dominance["index"] == shortest and report.dominant[0]["length"] == 5.0
    assert report.dominant[0]["length_quantile"] == 0.0
    assert report.dominant[0]["grad_norm"] == pytest.approx(norms[shortest])
    assert any(f.startswith("influence follows length: Spearman ρ = -1.00") for f in report.flags)
    assert not any(f.startswith("influence follows grad_norm") for f in report.flags)
    quiet = diagnose_scores(S, train_lengths=lengths, thresholds={"feature_spearman": 1.01, "dominance_share": 1.01})
    assert quiet.flags == [] and quiet.dominant == []


def test_ties_and_constant_properties():
    report = diagnose_scores(np.zeros((4, 5)), train_lengths=np.ones(5))
    assert report.dominance["tied_top1"] == 4 and report.dominance["index"] == 0
    assert any(f.startswith("tied top-1: 4 of 4 queries") for f in report.flags)
    assert report.correlations["length"]["mean_score"] is None
    assert "n/a (constant)" in str(report)
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data and data["thresholds"]["dominance_share"] == 0.2


def test_errors():
    S = planted_hub()
    train, test = labels_with_hub_agreeing(3)
    with pytest.raises(ValueError, match="Pass both train_labels and test_labels"):
        diagnose_scores(S, train_labels=train)
    with pytest.raises(ValueError, match=r"scores must be \(n_test, n_train\) = \(30, 20\) .* got \(20, 30\). It looks transposed: pass scores.T"):
        diagnose_scores(S.T, train, test)
    bad = S.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"scores has 1 non-finite entries \(NaN or inf\), the first at \[3, 4\]"):
        diagnose_scores(bad)
    with pytest.raises(ValueError, match="scores must have 2 dimensions; got shape"):
        diagnose_scores(S[0])
    with pytest.raises(ValueError, match=r"train_lengths must be 20 finite numbers .* got shape \(3,\)"):
        diagnose_scores(S, train_lengths=[1, 2, 3])
    with pytest.raises(ValueError, match=r"Unknown thresholds \['dominance'\]"):
        diagnose_scores(S, thresholds={"dominance": 0.5})


# --------------------------------------------------------------------------- load_scores
def test_npy_round_trip_with_sign(tmp_path):
    S = planted_hub()
    np.save(tmp_path / "s.npy", S)
    np.testing.assert_array_equal(load_scores(tmp_path / "s.npy"), S)
    np.testing.assert_array_equal(load_scores(str(tmp_path / "s.npy"), sign=-1), -S)
    np.save(tmp_path / "i.npy", np.arange(6, dtype=np.int32).reshape(2, 3))
    assert load_scores(tmp_path / "i.npy").dtype == np.float64


def _write_csv(path, S, header=None, index=None, delimiter=","):
    lines = [] if header is None else [delimiter.join(header)]
    for i, row in enumerate(S):
        cells = [repr(float(v)) for v in row]
        lines.append(delimiter.join(([] if index is None else [index[i]]) + cells))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("layout", ["plain", "pandas", "header_only", "index_only", "tsv"])
def test_csv_round_trip_with_sign(tmp_path, layout):
    S = planted_hub()[:4, :5]
    names = [f"train_{j}" for j in range(5)]
    queries = [f"q{i}" for i in range(4)]
    path = tmp_path / ("s.tsv" if layout == "tsv" else "s.csv")
    kw = {"plain": {}, "pandas": {"header": [""] + [str(j) for j in range(5)], "index": [str(i) for i in range(4)]},
          "header_only": {"header": names}, "index_only": {"index": queries},
          "tsv": {"header": ["query"] + names, "index": queries, "delimiter": "\t"}}[layout]
    _write_csv(path, S, **kw)
    np.testing.assert_array_equal(load_scores(path), S)
    np.testing.assert_array_equal(load_scores(path, sign=-1), -S)  # the study's "negative = helpful"


def test_csv_explicit_header_and_index(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("0,1,2\n0.5,0.25,1\n")  # a header of training ids cannot be told from data
    np.testing.assert_array_equal(load_scores(path), [[0, 1, 2], [0.5, 0.25, 1]])
    np.testing.assert_array_equal(load_scores(path, header=True), [[0.5, 0.25, 1]])
    path.write_text("id,a,b\n7,0.5,0.25\n8,1,2\n")
    np.testing.assert_array_equal(load_scores(path, index_col=True), [[0.5, 0.25], [1, 2]])
    np.testing.assert_array_equal(load_scores(path), [[7, 0.5, 0.25], [8, 1, 2]])
    path.write_text("0,0.5,0.25\n1,1,2\n2,3,4\n")
    with pytest.warns(UserWarning, match="first column of ids.csv counts 0, 1, ... like a row index"):
        load_scores(path)
    np.testing.assert_array_equal(load_scores(path, index_col=True), [[0.5, 0.25], [1, 2], [3, 4]])


def test_load_errors(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("a,b\n0.5,oops\n")
    with pytest.raises(ValueError, match=r"line 2, column 2 of s.csv is 'oops', not a number"):
        load_scores(path)
    path.write_text("0.5,\n")
    with pytest.raises(ValueError, match=r"line 1, column 2 of s.csv is '', not a number \(empty cell\)"):
        load_scores(path)
    path.write_text("0.5,1\n0.5\n")
    with pytest.raises(ValueError, match="line 2 of s.csv has 1 cells, line 1 has 2"):
        load_scores(path)
    path.write_text("0.5,nan\n1,2\n")
    with pytest.raises(ValueError, match=r"s.csv has 1 NaN/inf entries, the first at row 0, column 1"):
        load_scores(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="s.csv is empty"):
        load_scores(path)
    np.save(tmp_path / "v.npy", np.ones(3))
    with pytest.raises(ValueError, match=r"v.npy has shape \(3,\); expected a non-empty 2-D"):
        load_scores(tmp_path / "v.npy")
    np.save(tmp_path / "o.npy", np.array([[{"a": 1}]], dtype=object))
    with pytest.raises(ValueError, match="not a numeric .npy array .* never unpickled"):
        load_scores(tmp_path / "o.npy")
    np.save(tmp_path / "b.npy", np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="holds bool values; expected real numbers"):
        load_scores(tmp_path / "b.npy")
    with pytest.raises(ValueError, match=r"unsupported file type 's.json'. Supported suffixes: \('.npy', '.csv', '.tsv'\)"):
        load_scores(tmp_path / "s.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_scores(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match=r"sign must be 1 .* or -1 .*; got 2"):
        load_scores(path, sign=2)
    with pytest.raises(ValueError, match="header must be 'auto', True or False; got 'yes'"):
        load_scores(path, header="yes")


# --------------------------------------------------------------------------- diagnose
def test_diagnose_reports_what_diagnose_scores_finds_on_its_scores():
    """The planted-hub model of test_diagnose.py, plus a second label-0 hub for half the
    queries: both are flagged, and the dominance/concentration are diagnose_scores'."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2).to(DT)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    x = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.arange(20) % 2
    x[7], y[7] = torch.tensor([30.0, 0.0, 0.0], dtype=DT), 0
    x[4], y[4] = torch.tensor([0.0, 30.0, 0.0], dtype=DT), 0
    q = torch.rand(12, 3, generator=g, dtype=DT) * 0.1
    q[:6, 0] += 1.0  # these queries point towards #7, the others towards #4
    q[6:, 1] += 1.0
    queries = [(q, torch.zeros(12, dtype=torch.long))]
    est = InfluenceEstimator(Identity(), score_dtype=DT).fit(model, batches(x, y, 8))
    report = diagnose(est, queries, k=3, reference=None, compare=None)
    expected = diagnose_scores(est.pairwise_scores(queries))
    assert report.dominance == expected.dominance and report.concentration == expected.concentration
    assert sorted(map(tuple, report.dominance["top"])) == [(4, 6), (7, 6)]
    dominant = [f for f in report.flags if f.startswith("dominant example")]
    assert len(dominant) == 2 and dominant == [f for f in expected.flags if f.startswith("dominant example")]
    assert "effective number exp(H)          2.0" in str(report)
    assert set(influence.evaluation.THRESHOLDS) >= {"dominance_share", "dominance_min_count"}
