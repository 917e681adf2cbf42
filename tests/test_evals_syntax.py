"""Syntax scoring: batched == unbatched log-probs, BLiMP / Linzen follow a model made to prefer one token,
SyntaxGym formulas on a hand-written suite, region surprisals partition the sentence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trsae.data import DataError
from trsae.evals import eval_data_dir
from trsae.evals import syntax as sx
from trsae.evals import syntaxgym as sg

CAT, IS = 3797, 318  # GPT-2 ids of " cat" and " is"


@pytest.fixture
def biased_model(tiny_model):
    """tiny-gpt2 whose unembedding gets a +25 bias on " cat" and " is" (removed afterwards)."""
    hf = tiny_model.hf
    bias = torch.zeros(hf.config.vocab_size)
    bias[[CAT, IS]] = 25.0
    hf.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        yield tiny_model
    finally:
        hf.lm_head.bias = None


def test_batched_equals_unbatched(tiny_model):
    from trsae.saes import SAEConfig, make_sae

    texts = ["The cat sat.", "A much longer sentence, with many more tokens in it.", "Hi", "Green ideas sleep."]
    ids = [sx.text_ids(tiny_model, t)[0] for t in texts]
    one = sx.token_logprobs(tiny_model, ids, batch_size=1)
    many = sx.token_logprobs(tiny_model, ids, batch_size=4)
    part = sx.token_logprobs(tiny_model, ids, batch_size=4, first=[2, 6, 1, 3])
    for a, b, c, f in zip(one, many, part, [2, 6, 1, 3]):
        assert np.isnan(a[0]) and len(a) == len(b)
        np.testing.assert_allclose(a[1:], b[1:], atol=1e-4)
        assert np.isnan(c[:f]).all()
        np.testing.assert_allclose(a[f:], c[f:], atol=1e-4)
    sae = make_sae(SAEConfig.build(tiny_model.d_model, 64, "topk", k=4)).eval()
    s1 = sx.token_logprobs(tiny_model, ids, layer=1, sae=sae, batch_size=1)
    s4 = sx.token_logprobs(tiny_model, ids, layer=1, sae=sae, batch_size=4)
    for a, b in zip(s1, s4):
        np.testing.assert_allclose(a[1:], b[1:], atol=1e-4)
    assert max(np.nanmax(np.abs(a - b)) for a, b in zip(one, s1)) > 1e-3  # the splice changes the model
    ident = sx.token_logprobs(tiny_model, ids, layer=1, replace=lambda ids_BT, mask_BT: (lambda h: h),
                              batch_size=4)
    for a, b in zip(many, ident):
        np.testing.assert_allclose(a[1:], b[1:], atol=1e-5)
    with pytest.raises(ValueError):
        sx.token_logprobs(tiny_model, ids, sae=sae)  # an intervention needs its layer


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_blimp_follows_the_models_preference(biased_model, tmp_path):
    d = tmp_path / "blimp"
    d.mkdir()
    pairs = [("The cat sleeps.", "The dog sleeps."), ("I saw a cat today.", "I saw a dog today.")]
    _write_jsonl(d / "toy_good.jsonl", [{"sentence_good": g, "sentence_bad": b, "UID": "toy_good",
                                         "linguistics_term": "t"} for g, b in pairs])
    _write_jsonl(d / "toy_bad.jsonl", [{"sentence_good": b, "sentence_bad": g, "UID": "toy_bad",
                                        "linguistics_term": "t"} for g, b in pairs])
    res = sx.score_blimp(biased_model, max_items=10, data_dir=tmp_path, batch_size=3)
    assert res["per_paradigm"] == {"toy_bad": 0.0, "toy_good": 1.0}
    assert res["overall"] == 0.5 and res["n"] == 4 and res["per_term"] == {"t": 0.5}
    assert (res["margin"][res["uid"] == "toy_bad"] < -10).all()
    assert (res["margin"][res["uid"] == "toy_good"] > 10).all()
    assert sx.blimp_paradigms(tmp_path) == ["toy_bad", "toy_good"]


def test_linzen_follows_the_models_preference(biased_model, tmp_path):
    d = tmp_path / "linzen_agreement"
    d.mkdir()
    (d / "subj_agr_filtered.text").write_text("the dog near the cats is here . <eos>\n"
                                              "the dogs near the cat are here . <eos>\n"
                                              "the dog is here . <eos>\n")
    (d / "subj_agr_filtered.gold").write_text("5\tis\tare\t1\n5\tare\tis\t1\n2\tis\tare\t0\n")
    items = sx.linzen_items(data_dir=tmp_path)
    assert items[0] == {"prefix": "the dog near the cats", "correct": "is", "wrong": "are", "n_attractors": 1}
    res = sx.score_linzen(biased_model, data_dir=tmp_path)
    assert res["correct"].tolist() == [True, False, True]
    assert res["by_attractors"] == {0: {"accuracy": 1.0, "n": 1}, 1: {"accuracy": 0.5, "n": 2}}
    assert len(sx.linzen_items(max_items=1, data_dir=tmp_path)) == 2  # one per number of attractors


def test_linzen_mirror_format(data_dir):
    first = sx.linzen_items(max_items=1)[0]
    assert first == {"prefix": "as a consequence of being mostly privately owned , the town", "correct": "is",
                     "wrong": "are", "n_attractors": 0}
    g = sx.linzen_items("gulordava", max_items=1)
    assert g[0]["correct"] == "represents" and g[0]["wrong"] == "represent"


def test_formula_parser_precedence_and_errors():
    ev = lambda f: sg.evaluate_formula(sg.parse_formula(f), {})  # noqa: E731
    assert ev("1 + 2 > 2 & 3 - 1 = 2") is True
    assert ev("2 - 1 - 1 = 0") is True  # left-associative
    assert ev("1 < 3 - 1") is True and ev("2 = 1 + 1") is True  # + - bind tighter than comparisons
    assert ev("[1 > 2] | [2 > 1]") is True
    assert ev("[1 > 2] | (2 < 1)") is False
    assert ev("1 = 1.0005") is True and ev("1 = 1.01") is False  # SyntaxGym's isclose tolerance
    for bad in ("(1;%a%) <", "[(1;%a%) > 2", "(1;%a%) ** 2", "2 > 1 ]", "import os"):
        with pytest.raises(ValueError):
            sg.parse_formula(bad)
    with pytest.raises(KeyError):
        sg.evaluate_formula(sg.parse_formula("(3;%zzz%) > 0"), {("a", 1): 1.0})


def test_evaluate_suite_by_hand():
    suite = {"predictions": [
        {"type": "formula", "formula": "[(2;%match%) < (2;%mismatch%)] & [(1;%match%) = (1;%mismatch%)]"},
        {"type": "formula", "formula": "(*;%mismatch%) - (*;%match%) > 1.5"}]}
    surps = [
        {("match", 1): 2.0, ("match", 2): 3.0, ("mismatch", 1): 2.0005, ("mismatch", 2): 5.0},  # T, T
        {("match", 1): 1.0, ("match", 2): 4.0, ("mismatch", 1): 1.0, ("mismatch", 2): 4.5},  # T, F (0.5)
        {("match", 1): 1.0, ("match", 2): 6.0, ("mismatch", 1): 3.0, ("mismatch", 2): 5.0},  # F, F (1.0)
    ]
    res = sg.evaluate_suite(suite, surps)
    assert res["passed"].tolist() == [True, False, False]
    assert res["accuracy"] == pytest.approx(1 / 3)
    assert res["prediction_accuracy"] == pytest.approx([2 / 3, 1 / 3])


def test_region_surprisals_partition_the_sentence(tiny_model):
    regions = [{"region_number": 1, "content": "The cat"}, {"region_number": 2, "content": ""},
               {"region_number": 3, "content": " , "}, {"region_number": 4, "content": "sat down"}]
    text, spans = sg.condition_text(regions)
    assert text == "The cat, sat down" and spans[2] == (7, 7) and spans[3] == (7, 8)
    item = {"conditions": [{"condition_name": "c", "regions": regions}]}
    (surp,) = sg.region_surprisals(tiny_model, [item])
    assert surp[("c", 2)] == 0.0
    lp = sx.token_logprobs(tiny_model, [sx.text_ids(tiny_model, text)[0]])[0]
    assert sum(surp.values()) == pytest.approx(-lp[1:].sum() / math.log(2), rel=1e-6)
    # " sat" belongs to region 4 (its first non-space character), "," to region 3
    ids, offs = sx.text_ids(tiny_model, text)
    assert sx.token_anchor(text, offs[1:]) == [0, 4, 7, 9, 13]  # T, c, ",", s, d
    assert surp[("c", 3)] == pytest.approx(-lp[3] / math.log(2))
    # a whitespace-only token (SentencePiece's "▁" before digits) goes with the next word
    assert sx.token_anchor("a  b", [(0, 1), (1, 2), (2, 4)]) == [0, 3, 3]


def test_mirror_suites_parse_and_missing_data_is_clear(data_dir, tmp_path, monkeypatch):
    names = sg.syntaxgym_suites()
    assert len(names) == 34
    for n in names:
        for p in sg.load_suite(n)["predictions"]:
            sg.parse_formula(p["formula"])
    monkeypatch.delenv("TRSAE_DATA_DIR")
    with pytest.raises(DataError, match="TRSAE_DATA_DIR"):
        eval_data_dir("blimp", tmp_path)
