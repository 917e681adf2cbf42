"""Notebook 04's measures of one source (``sae=None``: the clean model and its raw activations): syntax and
discourse with the SAE spliced in, k-sparse probing, and automated interpretability without an API model,
returned in the nested ``{section: {key: value}}`` shape that `trsae.metrics.aggregate_seeds` and `trsae.report`
take, so that seeds aggregate to mean ± standard error like the core metrics.

The headline syntax number is ``blimp_kept`` = spliced BLiMP accuracy / clean accuracy: the share of the clean
model's accuracy an SAE keeps when its reconstruction replaces the layer's output.
"""

from __future__ import annotations

from trsae.evals import autointerp, discourse, probing, syntax, syntaxgym, ud
from trsae.lm import LoadedModel
from trsae.saes import SAE
from trsae.timing import phase, timed

PROBE_LABELS = ("upos", "deprel", "head_dist", "abs_pos", "word_pos", "connective", "clause_start")
"""The UD labels notebook 04 probes; tables and figures name them in words by `trsae.report.values.PROBE_WORDS`
(kept there, as the reporting package imports no torch; tests/test_report.py checks that it covers these)."""


@timed("syntax")
def syntax_scores(model: LoadedModel, layer: int, sae: SAE | None, blimp_items: int, blimp_paradigms,
                  suites, suite_items: int, linzen_items: int) -> dict:
    """BLiMP, SyntaxGym and Linzen agreement accuracy with ``sae`` spliced in at ``layer`` (clean if None)."""
    kw = {"layer": layer, "sae": sae} if sae is not None else {}
    b = syntax.score_blimp(model, blimp_paradigms, max_items=blimp_items, **kw)
    s = syntaxgym.score_syntaxgym(model, suites, max_items=suite_items, **kw)
    li = syntax.score_linzen(model, "linzen", max_items=linzen_items, **kw)
    return {"blimp": b["overall"], "blimp_macro": b["macro"], "syntaxgym": s["overall"], "linzen": li["accuracy"],
            "n_blimp": b["n"], "per_paradigm": b["per_paradigm"],
            "linzen_by_attractors": {str(a): v["accuracy"] for a, v in li["by_attractors"].items()}}


def syntax_kept(scores: dict, clean: dict) -> dict:
    """The share of the clean model's accuracy kept, per measure."""
    return {f"{m}_kept": scores[m] / clean[m] if clean[m] else float("nan")
            for m in ("blimp", "syntaxgym", "linzen")}


def probe_scores(model: LoadedModel, layer: int, sae: SAE | None, n_sentences: dict[str, int], ks, pack_tokens: int,
                 labels=PROBE_LABELS, seed: int = 0) -> tuple[dict, dict]:
    """Test accuracy of k-sparse probes of each UD label (``{f"{label}_k{k}": acc}``) and the test split's
    features (for the interpretability measures)."""
    with phase("probe features"):
        feats = {split: ud.ud_features(model, layer, sae, split=split, max_sentences=n, pack_tokens=pack_tokens)
                 for split, n in n_sentences.items()}
    out = {}
    for label in labels:
        with phase("probes"):
            res = probing.probe_ud(feats, label, ks=ks, seed=seed)
        for k, r in res.items():
            out[f"{label}_k{k}"] = r.test_acc
        out[f"{label}_majority"] = next(iter(res.values())).majority_acc if res else float("nan")
    return out, feats


@timed("discourse")
def gap_scores(model: LoadedModel, layer: int, sae: SAE | None, n_items: dict[str, int], ks,
               clean_pref: dict | None) -> tuple[dict, dict]:
    """GAP: the k-sparse antecedent probe at the pronoun, and the model's name preference (its accuracy and,
    for an SAE, agreement with the clean model's preference)."""
    splits = {"train": "development", "dev": "validation", "test": "test"}
    feats = {s: discourse.gap_features(model, layer, sae, split=g, max_items=n_items[s]) for s, g in splits.items()}
    probe = discourse.gap_probe(feats["train"], feats["dev"], feats["test"], ks=ks)
    kw = {"layer": layer, "sae": sae} if sae is not None else {}
    pref = discourse.gap_preference(model, "test", max_items=n_items["test"], **kw)
    out = {f"gap_probe_k{k}": r.test_acc for k, r in probe.items()}
    out["gap_preference_acc"] = pref["accuracy"]
    if clean_pref is not None:
        out["gap_agreement"] = discourse.preference_preserved(clean_pref, pref)["agreement"]
    return out, pref


@timed("autointerp")
def interp_scores(test_feats: "ud.UDFeatures", model: LoadedModel, f1_threshold: float) -> tuple[dict, "autointerp.LabelF1"]:
    """Density, best-label F1 (share of alive features at or above ``f1_threshold``, by label family) and
    temporal smoothness of an SAE's features on UD test text."""
    # labels live on UD words (their last sub-token); smoothness is over every token of the contexts
    res = autointerp.label_f1(test_feats.word_X, autointerp.ud_interp_labels(test_feats, tokenizer=model.tokenizer))
    sm = autointerp.temporal_smoothness(test_feats.tokens.X, test_feats.tokens.seq, test_feats.tokens.tok)
    out = {"labelled_frac": res.share_at_least(f1_threshold), "alive_frac": float(res.alive.mean()),
           "mean_density": float(res.density[res.alive].mean()) if res.alive.any() else float("nan"),
           "stay": sm["mean_stay"], "stay_lift": sm["mean_lift"]}
    out.update({f"labelled_{fam}": v for fam, v in res.share_by_family(f1_threshold).items()})
    return out, res


def evaluate_source(model: LoadedModel, layer: int, sae: SAE | None, p: dict, clean: dict | None) -> dict:
    """Every notebook-04 measure for one SAE (``None``: the clean model and its raw activations).

    ``p`` holds the notebook's sizes (blimp_paradigms, blimp_items, suites, suite_items, linzen_items,
    ud_sentences, gap_items, probe_ks, pack_tokens, f1_threshold); ``clean`` is the clean model's result
    (None when evaluating the clean model itself). Returns ``{"syntax", "discourse", "probing",
    "autointerp"}`` sections, plus ``"_gap_pref"`` and ``"_label_f1"`` / ``"_test_feats"`` for the caller."""
    syn = syntax_scores(model, layer, sae, p["blimp_items"], p["blimp_paradigms"], p["suites"], p["suite_items"],
                        p["linzen_items"])
    per_paradigm = syn.pop("per_paradigm")
    syn.pop("linzen_by_attractors")
    if clean is not None:
        syn.update(syntax_kept(syn, clean["syntax"]))
    gap, pref = gap_scores(model, layer, sae, p["gap_items"], p["probe_ks"],
                           None if clean is None else clean["_gap_pref"])
    probe, feats = probe_scores(model, layer, sae, p["ud_sentences"], p["probe_ks"], p["pack_tokens"])
    out = {"syntax": syn, "discourse": gap, "probing": probe, "blimp_per_paradigm": per_paradigm,
           "_gap_pref": pref, "_test_feats": feats["test"]}
    if sae is not None:
        out["autointerp"], out["_label_f1"] = interp_scores(feats["test"], model, p["f1_threshold"])
    return out


def public(result: dict) -> dict:
    """The JSON-able part of an `evaluate_source` result (drops the ``_``-prefixed working objects)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
