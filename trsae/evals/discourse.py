"""Discourse: GAP pronoun-antecedent (Webster et al. 2018). (Connectives and clause boundaries are UD labels,
``connective`` and ``clause_start`` in `trsae.evals.ud`.)

Each GAP row is a Wikipedia passage, a pronoun and two candidate names A and B with character offsets and
gold flags (A, B or neither). A passage is one context ``[BOS] + tokens(text)``; the pronoun and each name are
represented by their **last sub-token** (the token containing the span's last character, as for UD words).

**Antecedent probe.** For the rows where exactly one candidate is the antecedent, the probe input is the
concatenation ``[f(pronoun), f(A) - f(B)]`` (``2F`` columns: features at the pronoun, and the difference of the
features at the two names), the label is ``"A"`` or ``"B"``, and `trsae.evals.probing.sparse_probe` selects k
of the ``2F`` columns on GAP *development*, C on *validation*, and reports *test*. A linear probe on this input
can use what the pronoun's representation says about the referent and what distinguishes the two names
(it cannot form products such as "the pronoun is feminine and A is a woman"); the majority-class accuracy is
reported beside it. Names after the pronoun (about a quarter of the rows) are encoded where they occur.

**The model's own preference (proxy).** The passage is cut just before the pronoun, and the model scores each
name in the pronoun's slot: ``margin = log p(" A" | BOS, prefix) - log p(" B" | BOS, prefix)`` (summed over the
name's tokens). This measures which of the two names the model expects at the place where the pronoun
stands: it sees only the left context, and it is biased toward names with fewer tokens and names already
mentioned. It is not a coreference resolution by the model; it is a cheap, deterministic readout of its
referent expectation, used to ask whether a spliced SAE *preserves* it: agreement of the decisions
(sign of the margin) with the clean model, correlation of the margins, and accuracy against GAP gold.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from trsae.evals import eval_data_dir
from trsae.evals.probing import KS, CS, ProbeResult, sparse_probe
from trsae.evals.syntax import ReplaceFactory, continuation_logprobs
from trsae.evals.text import encode_contexts, encode_with_offsets, last_token_indices

GAP_SPLITS = ("development", "validation", "test")


def load_gap(split: str = "development", max_items: int | None = None,
             data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The first ``max_items`` rows of ``gap-<split>.tsv``: ``{"id", "text", "pronoun", "pronoun_offset", "a",
    "a_offset", "a_coref", "b", "b_offset", "b_coref", "label"}`` with ``label`` ``"A"``, ``"B"`` or
    ``"neither"``. Offsets are checked against the text."""
    if split not in GAP_SPLITS:
        raise ValueError(f"unknown GAP split {split!r}; expected one of {GAP_SPLITS}")
    path = eval_data_dir("gap", data_dir) / f"gap-{split}.tsv"
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if max_items is not None and i >= max_items:
                break
            item = {"id": r["ID"], "text": r["Text"], "pronoun": r["Pronoun"],
                    "pronoun_offset": int(r["Pronoun-offset"]),
                    "a": r["A"], "a_offset": int(r["A-offset"]), "a_coref": r["A-coref"].upper() == "TRUE",
                    "b": r["B"], "b_offset": int(r["B-offset"]), "b_coref": r["B-coref"].upper() == "TRUE"}
            for k in ("pronoun", "a", "b"):
                o = item[f"{k}_offset"]
                if item["text"][o:o + len(item[k])] != item[k]:
                    raise ValueError(f"GAP {item['id']}: {k} {item[k]!r} is not at offset {o}")
            item["label"] = "A" if item["a_coref"] and not item["b_coref"] else (
                "B" if item["b_coref"] and not item["a_coref"] else "neither")
            out.append(item)
    return out


@dataclass
class GapFeatures:
    """Features at the pronoun and at each candidate's last sub-token, one row per GAP item."""

    X_pron: object
    """``[N, F]`` (dense or CSR, as `encode_contexts` returns)."""
    X_a: object
    X_b: object
    labels: np.ndarray
    """``[N]`` ``"A"``, ``"B"`` or ``"neither"``."""
    items: list[dict]

    def probe_inputs(self):
        """``([N1, 2F] = [f(pronoun), f(A) - f(B)], [N1] labels)`` over the rows with one antecedent."""
        keep = np.flatnonzero(self.labels != "neither")
        P, D = self.X_pron[keep], self.X_a[keep] - self.X_b[keep]
        if hasattr(P, "toarray"):
            import scipy.sparse as sp

            return sp.hstack([P, D], format="csr"), self.labels[keep]
        return np.concatenate([P, D], axis=1), self.labels[keep]


def gap_positions(tokenizer, bos_id: int, item: dict) -> tuple[list[int], tuple[int, int, int]]:
    """``[BOS] + tokens(text)`` and the token indices (BOS = 0) of the pronoun, A and B (last sub-tokens)."""
    ids, offsets = encode_with_offsets(tokenizer, item["text"])
    spans = [(item[f"{k}_offset"], item[f"{k}_offset"] + len(item[k])) for k in ("pronoun", "a", "b")]
    p, a, b = (t + 1 for t in last_token_indices(offsets, spans))
    return [bos_id] + ids, (p, a, b)


def gap_features(model, layer: int, sae=None, split: str = "development", max_items: int | None = 500,
                 batch_size: int = 8, data_dir: str | os.PathLike | None = None,
                 sparse: bool | None = None) -> GapFeatures:
    """Raw activations (``sae=None``) or SAE codes at the pronoun, A and B of the first ``max_items`` rows."""
    items = load_gap(split, max_items, data_dir)
    ids, pos = [], []
    for it in items:
        i, p = gap_positions(model.tokenizer, model.bos_id, it)
        ids.append(i)
        pos.append(p)
    feats = encode_contexts(model, layer, ids, sae=sae, batch_size=batch_size, sparse=sparse)
    ctx = np.arange(len(items))
    pos_arr = np.asarray(pos, dtype=np.int64).reshape(len(items), 3)
    rows = [feats.rows(ctx, pos_arr[:, j]) for j in range(3)]
    return GapFeatures(X_pron=feats.X[rows[0]], X_a=feats.X[rows[1]], X_b=feats.X[rows[2]],
                       labels=np.array([it["label"] for it in items], dtype=object), items=items)


def gap_probe(train: GapFeatures, dev: GapFeatures, test: GapFeatures, ks=KS, Cs=CS,
              seed: int = 0) -> dict[int, ProbeResult]:
    """k-sparse antecedent probe (module docstring): train on ``train``, choose C on ``dev``, report ``test``."""
    (Xtr, ytr), (Xdv, ydv), (Xte, yte) = train.probe_inputs(), dev.probe_inputs(), test.probe_inputs()
    return sparse_probe(Xtr, ytr, Xdv, ydv, Xte, yte, ks=ks, Cs=Cs, seed=seed, min_class_count=1)


def gap_preference(model, split: str = "test", max_items: int | None = 200, layer: int | None = None, sae=None,
                   replace: ReplaceFactory | None = None, batch_size: int = 8,
                   data_dir: str | os.PathLike | None = None) -> dict:
    """The slot proxy (module docstring): ``{"margin": [N] log p(A) - log p(B), "prefers_a": [N] bool,
    "labels": [N], "accuracy": share of one-antecedent rows where the preferred name is the antecedent, "n"}``."""
    items = load_gap(split, max_items, data_dir)
    prefixes = [it["text"][:it["pronoun_offset"]].rstrip() for it in items]
    lp_a = continuation_logprobs(model, prefixes, [it["a"] for it in items], layer, sae, replace, batch_size)
    lp_b = continuation_logprobs(model, prefixes, [it["b"] for it in items], layer, sae, replace, batch_size)
    margin = lp_a - lp_b
    labels = np.array([it["label"] for it in items], dtype=object)
    one = labels != "neither"
    hit = np.where(margin > 0, "A", "B") == labels
    return {"margin": margin, "prefers_a": margin > 0, "labels": labels, "n": len(items),
            "accuracy": float(hit[one].mean()) if one.any() else float("nan")}


def preference_preserved(clean: dict, spliced: dict) -> dict:
    """How well a spliced model keeps the clean model's GAP preference: ``{"agreement": share of rows with
    the same preferred name, "margin_corr": Pearson r of the margins, "mean_abs_margin_change",
    "accuracy_clean", "accuracy_spliced"}``."""
    a, b = np.asarray(clean["margin"]), np.asarray(spliced["margin"])
    if a.shape != b.shape:
        raise ValueError("clean and spliced results cover different items")
    corr = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    return {"agreement": float(np.mean((a > 0) == (b > 0))), "margin_corr": corr,
            "mean_abs_margin_change": float(np.mean(np.abs(a - b))),
            "accuracy_clean": clean["accuracy"], "accuracy_spliced": spliced["accuracy"]}
