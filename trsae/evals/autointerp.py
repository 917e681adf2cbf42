"""Automated interpretability without an API model: density, best-label F1, temporal smoothness and
top-activating contexts of SAE features.

A feature is *active* on a row when its code is > 0. Inputs are `trsae.evals.ud` features: label F1 is
computed on the UD word rows (``UDFeatures.word_X`` with its labels, token identity being the id of the word's
last sub-token), smoothness and contexts on every ordinary token (``UDFeatures.tokens``).

- **Best label**: for a feature f and a label value v of a family (``upos``, ``deprel``, ``abs_pos``, …,
  ``token``), ``F1 = 2 |active ∧ (y = v)| / (|active| + |y = v|)`` over the rows; the best label is the
  (family, value) with the highest F1 (ties: the family listed first, then the smaller column). Values with
  fewer than ``min_label_count`` rows are not candidates (a value seen once would give F1 = 1 to any feature
  that fires exactly there). The headline is the share of *alive* features (active on some row) with best
  F1 >= 0.5.
- **Temporal smoothness**: over pairs of adjacent ordinary tokens (t, t+1) of the same context,
  ``P(active at t+1 | active at t)`` per feature, next to its density ``P(active)`` (what the conditional
  would be if activations were independent over time); ``lift = stay / density``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np


def _csr(X):
    import scipy.sparse as sp

    return X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))


def active(X):
    """``[N, F]`` CSR float32 indicator of ``X > 0``."""
    A = _csr(X).copy()
    A.data = (A.data > 0).astype(np.float32)
    A.eliminate_zeros()
    return A


def feature_density(X) -> np.ndarray:
    """``[F]`` share of rows on which each feature is active."""
    A = active(X)
    return np.asarray(A.sum(axis=0)).ravel() / max(A.shape[0], 1)


@dataclass
class LabelF1:
    """Each feature's best label and its F1 (module docstring)."""

    density: np.ndarray
    """``[F]`` share of rows where the feature is active."""
    family: np.ndarray
    """``[F]`` label family of the best label (``""`` when the feature never fires on a labelled row)."""
    value: np.ndarray
    """``[F]`` label value of the best label."""
    f1: np.ndarray
    """``[F]`` F1 of the best label (0 when none)."""
    precision: np.ndarray
    recall: np.ndarray

    @property
    def alive(self) -> np.ndarray:
        return self.density > 0

    def share_at_least(self, threshold: float = 0.5) -> float:
        """Share of alive features whose best F1 is >= ``threshold``."""
        a = self.alive
        return float(np.mean(self.f1[a] >= threshold)) if a.any() else float("nan")

    def share_by_family(self, threshold: float = 0.5) -> dict[str, float]:
        """Share of alive features whose best label has F1 >= ``threshold``, split by the label's family."""
        a = self.alive
        n = max(int(a.sum()), 1)
        fams = [f for f in dict.fromkeys(self.family[a].tolist()) if f]
        return {f: float(np.sum(a & (self.family == f) & (self.f1 >= threshold)) / n) for f in fams}


def label_f1(X, labels: dict[str, np.ndarray], min_label_count: int = 5) -> LabelF1:
    """Best label of every feature among ``labels`` (family -> ``[N]`` values aligned with the rows of
    ``X [N, F]``), by F1 of (feature active) vs (label = value)."""
    import scipy.sparse as sp

    A = active(X)
    N, F = A.shape
    n_act = np.asarray(A.sum(axis=0)).ravel()
    best = np.zeros(F)
    prec, rec = np.zeros(F), np.zeros(F)
    fam = np.full(F, "", dtype=object)
    val = np.full(F, "", dtype=object)
    AT = A.T.tocsr()
    for name, y in labels.items():
        y = np.asarray(y)
        if len(y) != N:
            raise ValueError(f"label {name!r} has {len(y)} rows, features have {N}")
        uniq, inv, cnt = np.unique(y, return_inverse=True, return_counts=True)
        ok = cnt >= min_label_count
        if not ok.any():
            continue
        rows = np.flatnonzero(ok[inv])
        L = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, inv[rows])), shape=(N, len(uniq)))
        tp = (AT @ L).tocoo()  # [F, V] co-occurrence counts
        if tp.nnz == 0:
            continue
        f1 = 2 * tp.data / (n_act[tp.row] + cnt[tp.col])
        order = np.lexsort((tp.col, -f1, tp.row))
        first = order[np.unique(tp.row[order], return_index=True)[1]]
        r, c, v = tp.row[first], tp.col[first], f1[first]
        better = v > best[r] + 1e-12
        r, c, v, t = r[better], c[better], v[better], tp.data[first][better]
        best[r] = v
        fam[r] = name
        val[r] = np.asarray(uniq[c]).astype(object)
        prec[r] = t / n_act[r]
        rec[r] = t / cnt[c]
    return LabelF1(density=n_act / max(N, 1), family=fam, value=val, f1=best, precision=prec, recall=rec)


def ud_interp_labels(feats, families=("upos", "deprel", "abs_pos", "word_pos"), tokenizer=None) -> dict:
    """Label families for `label_f1` on the UD word rows of ``feats`` (a `trsae.evals.ud.UDFeatures`): the
    named UD labels plus ``token``, the identity of each word's last sub-token (decoded with ``tokenizer``
    when given, else the id as a string)."""
    tid = feats.tokens.token_id[feats.word_rows]
    if tokenizer is not None:
        names = {int(i): tokenizer.decode([int(i)]) for i in np.unique(tid)}
        token = np.array([names[int(i)] for i in tid], dtype=object)
    else:
        token = tid.astype(str).astype(object)
    return {**{f: feats.labels[f] for f in families}, "token": token}


def temporal_smoothness(X, seq: np.ndarray, tok: np.ndarray, min_active: int = 5) -> dict:
    """Per-feature ``P(active at t+1 | active at t)`` over adjacent rows of the same context.

    ``X [N, F]`` with rows ordered by context then token, ``seq``/``tok`` ``[N]`` (as in `TokenFeatures`).
    Returns ``{"stay": [F] (NaN where the feature is active on fewer than min_active pair starts), "density":
    [F], "lift": [F] stay / density, "mean_stay", "mean_density", "mean_lift" (over features with a defined
    stay), "pooled_stay" (all features' co-active pairs / all active pair starts), "n_pairs"}``."""
    A = active(X)
    seq, tok = np.asarray(seq), np.asarray(tok)
    adj = np.flatnonzero((seq[1:] == seq[:-1]) & (tok[1:] == tok[:-1] + 1))
    density = np.asarray(A.sum(axis=0)).ravel() / max(A.shape[0], 1)
    A0, A1 = A[adj], A[adj + 1]
    start = np.asarray(A0.sum(axis=0)).ravel()
    both = np.asarray(A0.multiply(A1).sum(axis=0)).ravel()
    defined = start >= max(min_active, 1)
    stay = np.where(defined, both / np.maximum(start, 1), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(defined & (density > 0), stay / density, np.nan)
    d = defined
    return {"stay": stay, "density": density, "lift": lift,
            "mean_stay": float(np.mean(stay[d])) if d.any() else float("nan"),
            "mean_density": float(np.mean(density[d])) if d.any() else float("nan"),
            "mean_lift": float(np.mean(lift[d])) if d.any() else float("nan"),
            "pooled_stay": float(both.sum() / start.sum()) if start.sum() > 0 else float("nan"),
            "n_pairs": int(len(adj))}


# --------------------------------------------------------------------------------------------- contexts


def top_contexts(tokens, features: list[int], tokenizer, n: int = 8, left: int = 12, right: int = 4) -> list[dict]:
    """The ``n`` top-activating tokens of each feature (at most one per context), each with a window of
    ``left`` tokens before and ``right`` after: ``[{"feature", "max_act", "examples": [{"seq", "tok",
    "tokens": [str], "acts": [float], "center": index of the top token in the window}]}]``.

    ``tokens`` is a `trsae.evals.text.TokenFeatures` (rows ordered by context then token)."""
    X = _csr(tokens.X)
    XT = X.T.tocsr()
    out = []
    for f in features:
        lo, hi = XT.indptr[f], XT.indptr[f + 1]
        rows, vals = XT.indices[lo:hi], XT.data[lo:hi]
        order = np.lexsort((rows, -vals))
        seen, examples = set(), []
        for i in order:
            if vals[i] <= 0 or len(examples) >= n:
                break
            r = rows[i]
            c, t = int(tokens.seq[r]), int(tokens.tok[r])
            if c in seen:
                continue
            seen.add(c)
            ids = tokens.ids[c]
            a, b = max(0, t - left), min(len(ids), t + right + 1)
            r0, r1 = np.searchsorted(tokens.seq, c, "left"), np.searchsorted(tokens.seq, c, "right")
            col = X[r0:r1, f].toarray().ravel()
            act_of = {int(tokens.tok[q]): float(col[q - r0]) for q in range(r0, r1)}
            examples.append({"seq": c, "tok": t, "tokens": [tokenizer.decode([i]) for i in ids[a:b]],
                             "acts": [act_of.get(j, 0.0) for j in range(a, b)], "center": t - a})
        out.append({"feature": int(f), "max_act": float(vals.max()) if len(vals) else 0.0, "examples": examples})
    return out


def contexts_html(contexts: list[dict], title: str = "Top-activating contexts", labels: dict | None = None) -> str:
    """A small self-contained HTML page of `top_contexts` output: tokens HTML-escaped, each token's background
    proportional to its activation (relative to the feature's maximum), the top token outlined, the
    activation in a tooltip. ``labels`` (feature -> text, e.g. its best label and F1) is shown per feature."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:1em auto}"
             ".ex{font-family:monospace;white-space:pre-wrap;margin:.2em 0;line-height:1.6}"
             ".t{border-radius:2px}.top{outline:1px solid #c00}h2{font-size:1em;margin-top:1.2em}</style>",
             f"</head><body><h1>{html.escape(title)}</h1>"]
    for entry in contexts:
        f, m = entry["feature"], entry["max_act"] or 1.0
        extra = f" — {html.escape(str(labels[f]))}" if labels and f in labels else ""
        parts.append(f"<h2>feature {f} (max {entry['max_act']:.3g}){extra}</h2>")
        for ex in entry["examples"]:
            spans = []
            for j, (s, a) in enumerate(zip(ex["tokens"], ex["acts"])):
                alpha = max(0.0, min(1.0, a / m))
                cls = "t top" if j == ex["center"] else "t"
                text = html.escape(s.replace("\n", "\u23ce"))
                spans.append(f"<span class='{cls}' style='background:rgba(255,120,0,{alpha:.2f})' "
                             f"title='{a:.3g}'>{text}</span>")
            parts.append(f"<div class='ex'>{''.join(spans)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def feature_labels(res: LabelF1, features: list[int]) -> dict[int, str]:
    """Each feature's best label in words for display: ``"<family>=<value>, F1 <f1>, density <density>"``."""
    return {f: f"{res.family[f]}={res.value[f]}, F1 {res.f1[f]:.2f}, density {res.density[f]:.3g}" for f in features}


def pick_features(res: LabelF1, n: int = 8, min_density: float = 0.0) -> list[int]:
    """The ``n`` alive features with the highest best-label F1, at most one per best label, for display."""
    order = np.lexsort((np.arange(len(res.f1)), -res.f1))
    seen, out = set(), []
    for f in order:
        if res.density[f] <= min_density or res.f1[f] <= 0:
            continue
        key = (res.family[f], res.value[f])
        if key in seen:
            continue
        seen.add(key)
        out.append(int(f))
        if len(out) >= n:
            break
    return out
