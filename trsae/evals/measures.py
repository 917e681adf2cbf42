"""Notebook 04's measures of one source (``sae=None``: the clean model and its raw activations): syntax and
discourse with the SAE spliced in, k-sparse probing, and automated interpretability without an API model,
returned in the nested ``{section: {key: value}}`` shape that `trsae.metrics.aggregate_seeds` and `trsae.report`
take, so that seeds aggregate to mean ± standard error like the core metrics.

The headline syntax number is ``blimp_kept`` = spliced BLiMP accuracy / clean accuracy: the share of the clean
model's accuracy an SAE keeps when its reconstruction replaces the layer's output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trsae.evals import autointerp, discourse, probing, syntax, syntaxgym, ud
from trsae.lm import LoadedModel
from trsae.saes import SAE
from trsae.timing import phase, timed

PROBE_LABELS = ("upos", "deprel", "head_dist", "abs_pos", "word_pos", "connective", "clause_start")
"""The UD labels notebook 04 probes; tables and figures name them in words by `trsae.report.values.PROBE_WORDS`
(kept there, as the reporting package imports no torch; tests/test_report.py checks that it covers these)."""

Row = tuple[str, str, str]
"""A table row ``(section, key, label)`` of `trsae.report.results_table` (`trsae.report.values.Panel`)."""

SYNTAX_ROWS: list[Row] = [("syntax", m, m) for m in ("blimp", "syntaxgym", "linzen",
                                                     "blimp_kept", "syntaxgym_kept", "linzen_kept")]
"""Notebook 04's syntax table: accuracy with the SAE spliced in, and the share of the clean model's accuracy kept."""
AUTOINTERP_ROWS: list[Row] = [("autointerp", key, key)
                              for key in ("labelled_frac", "alive_frac", "mean_density", "stay", "stay_lift")]
"""Notebook 04's automated-interpretability table (SAEs only: the clean model has no features)."""
DISCOURSE_PROBES = ("connective", "clause_start")
"""The UD labels of `PROBE_LABELS` that the discourse table shows beside GAP."""


def gap_rows(probe_ks: Sequence[int]) -> list[Row]:
    """GAP's rows: the antecedent probe at each k, the model's name preference and its agreement with the clean
    model's."""
    return [("discourse", f"gap_probe_k{k}", f"GAP probe k={k}") for k in probe_ks] + [
        ("discourse", "gap_preference_acc", "GAP preference acc."),
        ("discourse", "gap_agreement", "GAP agreement w/ clean")]


def probe_rows(probe_ks: Sequence[int]) -> list[Row]:
    """The probing table: every label of `PROBE_LABELS` at every k."""
    return [("probing", f"{label}_k{k}", f"{label} k={k}") for label in PROBE_LABELS for k in probe_ks]


def discourse_rows(probe_ks: Sequence[int]) -> list[Row]:
    """The discourse table: `gap_rows`, then the probes of `DISCOURSE_PROBES` (connectives, clause starts)."""
    return gap_rows(probe_ks) + [r for r in probe_rows(probe_ks) if r[1].startswith(DISCOURSE_PROBES)]


def interp_tables(probe_ks: Sequence[int]) -> dict[str, list[Row]]:
    """Notebook 04's tables by name (``figures/interp_<name>_table.*``): syntax, discourse, probing, autointerp."""
    return {"syntax": SYNTAX_ROWS, "discourse": discourse_rows(probe_ks), "probing": probe_rows(probe_ks),
            "autointerp": AUTOINTERP_ROWS}


@dataclass(frozen=True)
class EvalSizes:
    """How much of each evaluation set notebook 04 scores (its parameters of the same names)."""

    blimp_paradigms: Sequence[str]
    """BLiMP paradigms scored."""
    blimp_items: int
    """Sentence pairs per paradigm."""
    suites: Sequence[str]
    """SyntaxGym suites scored."""
    suite_items: int
    """Items per suite."""
    linzen_items: int
    """Linzen agreement items."""
    ud_sentences: Mapping[str, int]
    """UD EWT sentences per probe split (``train``, ``dev``, ``test``)."""
    gap_items: Mapping[str, int]
    """GAP rows per probe split (``train``: GAP development, ``dev``: validation, ``test``)."""
    probe_ks: Sequence[int]
    """The k of the k-sparse probes."""
    pack_tokens: int
    """Tokens per packed UD context (`trsae.evals.ud.tokenize_ud`)."""
    f1_threshold: float
    """A feature counts as labelled when its best label's F1 is at least this."""

    def __post_init__(self):
        for name in ("ud_sentences", "gap_items"):
            if set(getattr(self, name)) != {"train", "dev", "test"}:
                raise ValueError(f"{name} must give train, dev and test sizes, got {dict(getattr(self, name))}")

    def to_dict(self) -> dict[str, Any]:
        """The sizes as a plain dict (`trsae.report.interp_macros` takes them so; cache keys hash them)."""
        return dataclasses.asdict(self)


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


def ud_test_features(model: LoadedModel, layer: int, sae: SAE | None, sizes: EvalSizes) -> "ud.UDFeatures":
    """The UD test split's features of one source, as `evaluate_source` computes them for its probes and
    automated interpretability."""
    with phase("probe features"):
        return ud.ud_features(model, layer, sae, split="test", max_sentences=sizes.ud_sentences["test"],
                              pack_tokens=sizes.pack_tokens)


def best_labels(test_feats: "ud.UDFeatures", model: LoadedModel) -> "autointerp.LabelF1":
    """Each feature's best label by F1 on the UD word rows of ``test_feats`` (`trsae.evals.autointerp.label_f1`)."""
    return autointerp.label_f1(test_feats.word_X, autointerp.ud_interp_labels(test_feats, tokenizer=model.tokenizer))


@timed("autointerp")
def interp_scores(test_feats: "ud.UDFeatures", model: LoadedModel,
                  f1_threshold: float) -> tuple[dict, "autointerp.LabelF1"]:
    """Density, best-label F1 (share of alive features at or above ``f1_threshold``, by label family) and
    temporal smoothness of an SAE's features on UD test text."""
    # labels live on UD words (their last sub-token); smoothness is over every token of the contexts
    res = best_labels(test_feats, model)
    sm = autointerp.temporal_smoothness(test_feats.tokens.X, test_feats.tokens.seq, test_feats.tokens.tok)
    out = {"labelled_frac": res.share_at_least(f1_threshold), "alive_frac": float(res.alive.mean()),
           "mean_density": float(res.density[res.alive].mean()) if res.alive.any() else float("nan"),
           "stay": sm["mean_stay"], "stay_lift": sm["mean_lift"]}
    out.update({f"labelled_{fam}": v for fam, v in res.share_by_family(f1_threshold).items()})
    return out, res


def evaluate_source(model: LoadedModel, layer: int, sae: SAE | None, sizes: EvalSizes,
                    clean: dict | None) -> dict:
    """Every notebook-04 measure for one SAE (``None``: the clean model and its raw activations).

    ``clean`` is the clean model's result (None when evaluating the clean model itself; its ``syntax`` and
    ``_gap_pref`` are read). Returns ``{"syntax", "discourse", "probing", "blimp_per_paradigm"}`` (and for an SAE
    ``"autointerp"``) sections, plus the working objects ``"_gap_pref"``, ``"_test_feats"`` and (for an SAE)
    ``"_label_f1"``: `public` drops them, `ud_features_of` and `label_f1_of` read them."""
    syn = syntax_scores(model, layer, sae, sizes.blimp_items, sizes.blimp_paradigms, sizes.suites, sizes.suite_items,
                        sizes.linzen_items)
    per_paradigm = syn.pop("per_paradigm")
    syn.pop("linzen_by_attractors")
    if clean is not None:
        syn.update(syntax_kept(syn, clean["syntax"]))
    gap, pref = gap_scores(model, layer, sae, sizes.gap_items, sizes.probe_ks,
                           None if clean is None else clean["_gap_pref"])
    probe, feats = probe_scores(model, layer, sae, sizes.ud_sentences, sizes.probe_ks, sizes.pack_tokens)
    out = {"syntax": syn, "discourse": gap, "probing": probe, "blimp_per_paradigm": per_paradigm,
           "_gap_pref": pref, "_test_feats": feats["test"]}
    if sae is not None:
        out["autointerp"], out["_label_f1"] = interp_scores(feats["test"], model, sizes.f1_threshold)
    return out


def public(result: dict) -> dict:
    """The JSON-able part of an `evaluate_source` result (drops the ``_``-prefixed working objects)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def ud_features_of(result: dict) -> "ud.UDFeatures":
    """The UD test split's features (raw activations or SAE codes) of an `evaluate_source` result."""
    return result["_test_feats"]


def label_f1_of(result: dict) -> "autointerp.LabelF1":
    """Each feature's best label (`best_labels`) of an SAE's `evaluate_source` result."""
    if "_label_f1" not in result:
        raise KeyError("the clean model's result has no feature labels (only an SAE's has)")
    return result["_label_f1"]
