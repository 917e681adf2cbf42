"""Notebook 04's evaluations in the package: the rows of its tables, its evaluation sizes, and the cache of each
source's result (read back equal to a fresh evaluation), with the top contexts recomputed for one SAE."""

from __future__ import annotations

import dataclasses
import math
import numbers

import pytest
import torch

from trsae.evals import autointerp, interp, measures
from trsae.saes import SAEConfig, make_sae

SIZES = measures.EvalSizes(blimp_paradigms=["anaphor_number_agreement", "regular_plural_subject_verb_agreement_1"],
                           blimp_items=4, suites=["number_prep"], suite_items=2, linzen_items=3,
                           ud_sentences={"train": 40, "dev": 15, "test": 15},
                           gap_items={"train": 20, "dev": 10, "test": 10}, probe_ks=[1, 5], pack_tokens=64,
                           f1_threshold=0.5)


def _old_rows(probe_ks):
    """The rows as notebook 04 built them before they moved into `trsae.evals.measures` (its code, verbatim)."""
    rows = [("syntax", m, m) for m in ("blimp", "syntaxgym", "linzen", "blimp_kept", "syntaxgym_kept",
                                       "linzen_kept")]
    rows += [("discourse", f"gap_probe_k{kk}", f"GAP probe k={kk}") for kk in probe_ks]
    rows += [("discourse", "gap_preference_acc", "GAP preference acc."),
             ("discourse", "gap_agreement", "GAP agreement w/ clean")]
    probe_rows = [("probing", f"{lab}_k{kk}", f"{lab} k={kk}") for lab in measures.PROBE_LABELS for kk in probe_ks]
    auto_rows = [("autointerp", key, key)
                 for key in ("labelled_frac", "alive_frac", "mean_density", "stay", "stay_lift")]
    discourse_rows = rows[6:] + [r for r in probe_rows if r[1].startswith(("connective", "clause_start"))]
    return rows, probe_rows, auto_rows, discourse_rows


@pytest.mark.parametrize("probe_ks", [[1, 5], [1, 2, 5, 10, 20], [3]])
def test_rows_are_the_notebooks_old_rows(probe_ks):
    rows, probe_rows, auto_rows, discourse_rows = _old_rows(probe_ks)
    assert measures.SYNTAX_ROWS == rows[:6]
    assert measures.SYNTAX_ROWS + measures.gap_rows(probe_ks) == rows  # notebook 04's first printed table
    assert measures.probe_rows(probe_ks) == probe_rows
    assert measures.AUTOINTERP_ROWS == auto_rows
    assert measures.discourse_rows(probe_ks) == discourse_rows
    assert measures.interp_tables(probe_ks) == {"syntax": rows[:6], "discourse": discourse_rows,
                                                "probing": probe_rows, "autointerp": auto_rows}


def test_sizes_are_the_old_dict_and_checked():
    old = dict(blimp_paradigms=SIZES.blimp_paradigms, blimp_items=4, suites=["number_prep"], suite_items=2,
               linzen_items=3, ud_sentences={"train": 40, "dev": 15, "test": 15},
               gap_items={"train": 20, "dev": 10, "test": 10}, probe_ks=[1, 5], pack_tokens=64, f1_threshold=0.5)
    assert SIZES.to_dict() == old and list(SIZES.to_dict()) == list(old)
    with pytest.raises(ValueError, match="ud_sentences"):
        dataclasses.replace(SIZES, ud_sentences={"train": 40, "test": 15})
    with pytest.raises(dataclasses.FrozenInstanceError):
        SIZES.blimp_items = 5


def _same(a, b) -> bool:
    """Equal values, keys in the same order, NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def test_results_are_cached_and_equal_fresh_ones(tiny_model, tmp_path, monkeypatch):
    d = tiny_model.d_model
    torch.manual_seed(0)
    topk = make_sae(SAEConfig.build(d, 8 * d, "topk", k=4)).eval()
    torch.manual_seed(1)
    trsae = make_sae(SAEConfig.build(d, 8 * d, "topk", "trsae", k=4, window=4)).eval()
    trained = {"TopK": [(tmp_path / "runs" / "topk", topk)], "TRSAE": [(tmp_path / "runs" / "trsae", trsae)]}
    evaluate = measures.evaluate_source
    calls = []

    def counted(model, layer, sae, sizes, clean):
        calls.append(sae)
        return evaluate(model, layer, sae, sizes, clean)

    monkeypatch.setattr(measures, "evaluate_source", counted)
    first = interp.interp_results(tiny_model, 1, trained, SIZES, tmp_path / "work")
    assert calls == [None, topk, trsae]
    assert interp.clean_path(tmp_path / "work", tiny_model, 1, SIZES).is_file()
    assert interp.run_path(tmp_path / "runs" / "trsae", tiny_model, 1, SIZES).is_file()
    again = interp.interp_results(tiny_model, 1, trained, SIZES, tmp_path / "work")
    assert len(calls) == 3  # every result read from its cache
    assert _same(again, first)

    clean = evaluate(tiny_model, 1, None, SIZES, None)
    fresh = evaluate(tiny_model, 1, trsae, SIZES, clean)
    assert _same(measures.public(clean), first[0])
    assert _same(measures.public(fresh), first[1]["TRSAE"][0])
    fresh_runs = {"TopK": first[1]["TopK"], "TRSAE": [measures.public(fresh)]}
    assert _same(interp.summarize(*first), interp.summarize(measures.public(clean), fresh_runs))
    assert list(interp.summarize(*first)) == [interp.CLEAN, "TopK", "TRSAE"]

    # the top contexts, recomputed, are those of the fresh result's own features and labels
    top = interp.top_contexts(tiny_model, 1, "TRSAE", trsae, SIZES)
    best = measures.label_f1_of(fresh)
    picked = autointerp.pick_features(best, n=6)
    assert picked and [c["feature"] for c in top.contexts] == picked
    assert top.contexts == autointerp.top_contexts(measures.ud_features_of(fresh).tokens, picked, tiny_model.tokenizer)
    assert top.labels == autointerp.feature_labels(best, picked)
    assert top.html.startswith("<!DOCTYPE html>") and "TRSAE: top-activating contexts (UD EWT test)" in top.html
    with pytest.raises(KeyError):
        measures.label_f1_of(clean)


def test_cache_key_follows_sizes_layer_and_code(tiny_model, monkeypatch):
    key = interp.cache_key(tiny_model, 1, SIZES)
    assert interp.cache_key(tiny_model, 1, dataclasses.replace(SIZES, blimp_items=5)) != key
    assert interp.cache_key(tiny_model, 0, SIZES) != key
    monkeypatch.setattr(interp, "code_version", lambda: "other code")
    assert interp.cache_key(tiny_model, 1, SIZES) != key
