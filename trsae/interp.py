"""Notebook 04's steps: syntax and discourse with each SAE spliced in, k-sparse probing, and automated
interpretability without an API model — each over named SAEs (``None`` = the clean model / raw activations),
returned in the nested ``{section: {key: value}}`` shape that `trsae.metrics.aggregate_seeds` and
`trsae.report` take, so that seeds aggregate to mean ± standard error like the core metrics.

The headline syntax number is ``blimp_kept`` = spliced BLiMP accuracy / clean accuracy: the share of the clean
model's accuracy an SAE keeps when its reconstruction replaces the layer's output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trsae.evals import autointerp, discourse, probing, syntax, ud
from trsae.lm import LoadedModel
from trsae.saes import SAE

ALIGNMENT = "the last sub-token of each word"
PROBE_LABELS = ("upos", "deprel", "head_dist", "abs_pos", "word_pos", "connective", "clause_start")


def syntax_scores(model: LoadedModel, layer: int, sae: SAE | None, blimp_items: int, blimp_paradigms,
                  suites, suite_items: int, linzen_items: int) -> dict:
    """BLiMP, SyntaxGym and Linzen agreement accuracy with ``sae`` spliced in at ``layer`` (clean if None)."""
    kw = {"layer": layer, "sae": sae} if sae is not None else {}
    b = syntax.score_blimp(model, blimp_paradigms, max_items=blimp_items, **kw)
    s = syntax.score_syntaxgym(model, suites, max_items=suite_items, **kw)
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
    feats = {split: ud.ud_features(model, layer, sae, split=split, max_sentences=n, pack_tokens=pack_tokens)
             for split, n in n_sentences.items()}
    out = {}
    for label in labels:
        res = probing.probe_ud(feats, label, ks=ks, seed=seed)
        for k, r in res.items():
            out[f"{label}_k{k}"] = r.test_acc
        out[f"{label}_majority"] = next(iter(res.values())).majority_acc if res else float("nan")
    return out, feats


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


def top_contexts_figure(contexts: list[dict], path: str | Path, n_features: int = 4) -> Path:
    """For each of the first ``n_features`` features, its top-activating context as a bar chart of the
    activation over the window's tokens (the top token in red)."""
    entries = [c for c in contexts if c["examples"]][:n_features]
    fig = Figure(figsize=(9, 1.9 * max(len(entries), 1)))
    FigureCanvasAgg(fig)
    for i, entry in enumerate(entries):
        ax = fig.add_subplot(len(entries), 1, i + 1)
        ex = entry["examples"][0]
        colors = ["#C44E52" if j == ex["center"] else "#4C72B0" for j in range(len(ex["tokens"]))]
        ax.bar(range(len(ex["acts"])), ex["acts"], color=colors)
        ax.set_xticks(range(len(ex["tokens"])))
        ax.set_xticklabels([t.replace("\n", "\\n") for t in ex["tokens"]], rotation=60, fontsize=7)
        ax.set_ylabel(f"f{entry['feature']}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def probing_figure(results: dict[str, dict], labels, ks, path: str | Path) -> Path:
    """Probe test accuracy against k (log axis), one panel per label, one line per source."""
    fig = Figure(figsize=(3.2 * len(labels), 3.0))
    FigureCanvasAgg(fig)
    for i, label in enumerate(labels):
        ax = fig.add_subplot(1, len(labels), i + 1)
        for name, res in results.items():
            p = res["probing"]
            ys = [_mean(p.get(f"{label}_k{k}")) for k in ks]
            ax.plot(ks, ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("k latents")
        if i == 0:
            ax.set_ylabel("test accuracy")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    return path


def _mean(v):
    if isinstance(v, dict):
        return v.get("mean", np.nan)
    return np.nan if v is None else v


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


def macros(summary: dict, clean: dict, probe_ks, f1_threshold: float, sizes: dict,
           names=("TRSAE", "TopK")) -> dict:
    """Paper macros of notebook 04 (``\\interp...``): setup and sample sizes (``sizes`` as `evaluate_source`
    takes them), the clean BLiMP accuracy, and per SAE the BLiMP accuracy kept, position and relation probes at
    k nearest 5, and the share of labelled features."""
    k = min(probe_ks, key=lambda v: abs(v - 5))
    ud = sizes["ud_sentences"]
    out = {"interpAlignment": ALIGNMENT, "interpProbeK": k, "interpFOneThreshold": f1_threshold,
           "interpCleanBlimpAcc": clean["syntax"]["blimp"], "interpBlimpPairs": int(clean["syntax"]["n_blimp"]),
           "interpBlimpParadigms": len(sizes["blimp_paradigms"]), "interpSuites": len(sizes["suites"]),
           "interpSuiteItems": sizes["suite_items"], "interpLinzenItems": sizes["linzen_items"],
           "interpUdTrain": ud["train"], "interpUdDev": ud["dev"], "interpUdTest": ud["test"],
           "interpGapTest": sizes["gap_items"]["test"]}
    for name in names:
        s = summary[name]
        for key, leaf in (("BlimpKept", s["syntax"]["blimp_kept"]), ("PositionProbe", s["probing"][f"word_pos_k{k}"]),
                          ("DeprelProbe", s["probing"][f"deprel_k{k}"]),
                          ("LabelledFrac", s["autointerp"]["labelled_frac"])):
            out[f"interp{name}{key}"], out[f"interp{name}{key}Se"] = leaf["mean"], leaf["se"]
    return out
