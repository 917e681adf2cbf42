"""Automated interpretability on hand-made features with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from trsae.evals import autointerp as ai
from trsae.evals.text import TokenFeatures

# 6 rows x 3 features: f0 fires on rows 0-2, f1 on rows 3-4, f2 never
X = np.zeros((6, 3))
X[[0, 1, 2], 0] = [1.0, 2.0, 0.5]
X[[3, 4], 1] = [3.0, 1.0]
LABELS = {"upos": np.array(["N", "N", "V", "V", "V", "N"]), "pos": np.array(["1", "1", "1", "2", "2", "2"])}


def test_density():
    np.testing.assert_allclose(ai.feature_density(sp.csr_matrix(X)), [0.5, 2 / 6, 0.0])


def test_label_f1_by_hand():
    r = ai.label_f1(X, LABELS, min_label_count=3)
    # f0: upos N 2*2/(3+3) = .67, pos "1" 2*3/(3+3) = 1 -> pos "1"
    assert (r.family[0], r.value[0]) == ("pos", "1") and r.f1[0] == pytest.approx(1.0)
    # f1: upos V 2*2/(2+3) = .8 ties pos "2" = .8 -> the family listed first
    assert (r.family[1], r.value[1]) == ("upos", "V") and r.f1[1] == pytest.approx(0.8)
    assert r.precision[1] == pytest.approx(1.0) and r.recall[1] == pytest.approx(2 / 3)
    assert r.family[2] == "" and r.f1[2] == 0.0 and not r.alive[2]
    assert r.share_at_least(0.5) == 1.0 and r.share_at_least(0.9) == 0.5
    assert r.share_by_family(0.5) == {"pos": 0.5, "upos": 0.5}
    assert ai.pick_features(r, 5) == [0, 1]
    # values rarer than min_label_count are never candidates
    assert ai.label_f1(X, LABELS, min_label_count=4).f1.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        ai.label_f1(X, {"bad": np.array(["a"])})


def test_temporal_smoothness_by_hand():
    seq, tok = np.array([0, 0, 0, 0, 1, 1]), np.array([1, 2, 3, 5, 1, 2])
    Xt = np.zeros((6, 2))
    Xt[[0, 1, 2, 3, 4], 0] = 1.0  # adjacent pairs: (0,1) (1,2) (4,5); f0 stays on 2 of its 3 pair starts
    Xt[[2, 3], 1] = 1.0  # rows 2,3 are not adjacent (token 3 -> 5): f1 starts no pair
    r = ai.temporal_smoothness(Xt, seq, tok, min_active=1)
    assert r["n_pairs"] == 3
    assert r["stay"][0] == pytest.approx(2 / 3) and np.isnan(r["stay"][1])
    assert r["density"].tolist() == pytest.approx([5 / 6, 2 / 6])
    assert r["lift"][0] == pytest.approx((2 / 3) / (5 / 6)) and r["pooled_stay"] == pytest.approx(2 / 3)


class _Tok:
    def decode(self, ids):
        return {7: "<script>", 8: " & ", 9: "a\nb"}.get(ids[0], f"t{ids[0]}")


def test_top_contexts_and_html():
    ids = [[0, 5, 7, 8, 9], [0, 9, 8]]
    feats = np.zeros((6, 2))
    feats[:, 0] = [0.1, 0.9, 0.0, 0.3, 0.0, 0.5]  # rows: ctx0 tokens 1-4, ctx1 tokens 1-2
    tf = TokenFeatures(X=sp.csr_matrix(feats), seq=np.array([0, 0, 0, 0, 1, 1]), tok=np.array([1, 2, 3, 4, 1, 2]),
                       token_id=np.array([5, 7, 8, 9, 9, 8]), ids=ids)
    (entry,) = ai.top_contexts(tf, [0], _Tok(), n=5, left=1, right=1)
    assert entry["max_act"] == pytest.approx(0.9)
    first, second = entry["examples"]  # one example per context, strongest first
    assert (first["seq"], first["tok"], first["center"]) == (0, 2, 1)
    assert first["tokens"] == ["t5", "<script>", " & "] and first["acts"] == pytest.approx([0.1, 0.9, 0.0])
    assert (second["seq"], second["tok"]) == (1, 2)
    page = ai.contexts_html([entry], title="a<b", labels={0: "upos=N (F1 0.9)"})
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp;" in page and "a&lt;b" in page
    assert "rgba(255,120,0,1.00)" in page and "upos=N" in page
