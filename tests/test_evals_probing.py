"""k-sparse probing recovers planted features; GAP preference summary."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from trsae.evals.probing import class_scores, sparse_probe, top_k


def _planted(n: int, seed: int, n_cols: int = 40):
    """Noise columns; column 17 = binary label + small noise; 3-class label planted in columns 3, 5, 30."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_cols))
    yb = rng.integers(0, 2, size=n)
    X[:, 17] = yb + 0.1 * rng.normal(size=n)
    ym = rng.integers(0, 3, size=n)
    for c, col in enumerate((3, 5, 30)):
        X[:, col] = (ym == c) * 2.0 + 0.1 * rng.normal(size=n)
    return X, np.where(yb == 1, "yes", "no"), np.array(["a", "b", "c"])[ym]


@pytest.fixture(scope="module")
def splits():
    return [_planted(n, s) for n, s in ((600, 0), (200, 1), (200, 2))]


def test_k1_finds_planted_binary_feature(splits):
    (Xtr, ytr, _), (Xdv, ydv, _), (Xte, yte, _) = splits
    res = sparse_probe(Xtr, ytr, Xdv, ydv, Xte, yte, ks=(1, 5))
    assert res[1].latents == {"yes": [17]}
    assert res[1].test_acc > 0.98 and res[1].test_macro_f1 > 0.98
    assert res[1].majority_acc < 0.6
    assert res[5].test_acc > 0.98 and 17 in res[5].latents["yes"]


def test_multiclass_one_vs_rest_finds_each_class_column(splits):
    (Xtr, _, ytr), (Xdv, _, ydv), (Xte, _, yte) = splits
    res = sparse_probe(Xtr, ytr, Xdv, ydv, Xte, yte, ks=(1,))[1]
    assert res.latents == {"a": [3], "b": [5], "c": [30]}
    assert res.test_acc > 0.98 and res.classes == ["a", "b", "c"]


def test_probe_without_signal_is_near_chance(splits):
    (Xtr, ytr, _), (Xdv, ydv, _), (Xte, yte, _) = splits
    keep = [c for c in range(Xtr.shape[1]) if c != 17]
    res = sparse_probe(Xtr[:, keep], ytr, Xdv[:, keep], ydv, Xte[:, keep], yte, ks=(1,))[1]
    assert res.test_acc < 0.7


def test_deterministic_and_sparse_equals_dense(splits):
    (Xtr, ytr, _), (Xdv, ydv, _), (Xte, yte, _) = splits
    Xtr, Xdv, Xte = (np.clip(X, 0, None) for X in (Xtr, Xdv, Xte))  # SAE-like: non-negative, many zeros
    a = sparse_probe(Xtr, ytr, Xdv, ydv, Xte, yte, ks=(2,), max_train=500, seed=3)[2]
    b = sparse_probe(Xtr, ytr, Xdv, ydv, Xte, yte, ks=(2,), max_train=500, seed=3)[2]
    c = sparse_probe(sp.csr_matrix(Xtr), ytr, sp.csr_matrix(Xdv), ydv, sp.csr_matrix(Xte), yte, ks=(2,),
                     max_train=500, seed=3)[2]
    assert a.to_dict() == b.to_dict()
    assert a.latents == c.latents and a.test_acc == pytest.approx(c.test_acc) and a.C == c.C
    assert a.n_train == 500


def test_selection_score_and_rare_classes():
    X = np.array([[0.0, 1.0], [0.0, 3.0], [2.0, 1.0], [2.0, 3.0]])
    y = np.array(["p", "p", "q", "q"])
    s = class_scores(X, y, ["q"])  # column 0: |2 - 0| / std 1 = 2; column 1: no difference
    np.testing.assert_allclose(s, [[2.0, 0.0]])
    assert top_k(np.array([1.0, 3.0, 3.0, 0.0]), 2).tolist() == [1, 2]
    Xtr = np.vstack([X] * 5)
    ytr = np.array((["p", "p", "q", "q"] * 5)[:-1] + ["rare"])
    res = sparse_probe(Xtr, ytr, X, y, np.vstack([X, X[:1]]), np.append(y, "rare"), ks=(1,), min_class_count=3)[1]
    assert res.classes == ["p", "q"] and res.n_dropped == {"train": 1, "dev": 0, "test": 1}
    assert res.test_acc == 1.0


def test_gap_preference_preserved_by_hand():
    from trsae.evals.discourse import preference_preserved

    clean = {"margin": np.array([1.0, -2.0, 3.0, -0.5]), "accuracy": 0.75}
    spliced = {"margin": np.array([0.5, -1.0, -1.0, -0.5]), "accuracy": 0.5}
    r = preference_preserved(clean, spliced)
    assert r["agreement"] == 0.75
    assert r["mean_abs_margin_change"] == pytest.approx((0.5 + 1 + 4 + 0) / 4)
    assert r["accuracy_clean"] == 0.75 and r["accuracy_spliced"] == 0.5
