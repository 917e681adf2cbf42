"""The dashboard's data: one JSON-ready record per feature and one index row per feature, from a `Pass` and the
SAE's weights. Numbers are rounded to three significant digits (codes, logits) or two decimals (attention
weights, cosines) to keep a 5120-feature site small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from trsae.dashboard.collect import (Pass, densities, histograms, pick_examples, position_profile,
                                     window_weights)
from trsae.dashboard.weights import logit_extremes, nearest, strengths
from trsae.saes import SAE
from trsae.saes.context import bucket_bounds
from trsae.saes.trsae import TRSAEEncoder

INDEX_COLUMNS = ("id", "density", "max", "label", "f1", "ctx", "pos", "match", "match_cos", "top_tokens")
"""Fields of an index row, in order (``label``/``f1`` None without labels, ``ctx``/``pos`` None for a per-token
SAE, ``match`` None with one SAE)."""


def r3(x: float) -> float | int:
    """Three significant digits (0 stays the int 0, the shortest JSON)."""
    x = float(x)
    return 0 if x == 0 else float(f"{x:.3g}")


def r2(x: float) -> float | int:
    x = round(float(x), 2)
    return 0 if x == 0 else x


@dataclass
class Settings:
    """How much of each feature the site shows."""

    n_top: int = 10
    """Top-activating contexts per feature."""
    n_bands: int = 4
    """Quantile bands of the activation distribution to sample from."""
    per_band: int = 2
    """Contexts sampled per band."""
    left: int = 10
    """Tokens shown before the active token (at least the TRSAE window, at most 32)."""
    right: int = 3
    """Tokens shown after it."""
    n_logits: int = 10
    """Top and bottom unembedding logits per feature."""
    n_neighbours: int = 8
    hist_bins: int = 24
    seed: int = 0


@dataclass
class SAEData:
    """An SAE's per-feature arrays, computed once for all its features."""

    name: str
    sae: SAE
    p: Pass
    density_F: np.ndarray
    max_F: np.ndarray
    hist_FB: np.ndarray
    pos_start_P: np.ndarray
    pos_mean_FP: np.ndarray
    pos_rate_FP: np.ndarray
    nbr: tuple[torch.Tensor, torch.Tensor]
    strength: tuple[np.ndarray, np.ndarray] | None
    logits: tuple[torch.Tensor, ...] | None = None
    match: tuple[torch.Tensor, torch.Tensor] | None = None
    other: str | None = None
    labels: dict[int, list[tuple[str, float]]] = field(default_factory=dict)


def parse_labels(raw: dict | None) -> dict[int, list[tuple[str, float]]]:
    """``{feature: [label, f1]}`` or ``{feature: [[label, f1], ...]}`` (JSON keys are strings) as
    ``{int feature: [(label, f1), ...]}``, best F1 first."""
    out: dict[int, list[tuple[str, float]]] = {}
    for k, v in (raw or {}).items():
        pairs = [v] if v and isinstance(v[0], str) else v
        try:
            out[int(k)] = sorted(((str(a), float(b)) for a, b in pairs), key=lambda x: -x[1])
        except (TypeError, ValueError) as e:
            raise ValueError(f"labels: feature {k!r} must map to [label, f1] or a list of them, got {v!r}") from e
    return out


def summarise(name: str, sae: SAE, p: Pass, s: Settings, hf: torch.nn.Module | None = None,
              labels: dict | None = None) -> SAEData:
    W_dec = sae.W_dec.detach().float()
    max_F, hist_FB = histograms(p, s.hist_bins)
    pos_start, pos_mean, pos_rate = position_profile(p)
    d = SAEData(name=name, sae=sae, p=p, density_F=densities(p), max_F=max_F, hist_FB=hist_FB,
                pos_start_P=pos_start, pos_mean_FP=pos_mean, pos_rate_FP=pos_rate,
                nbr=nearest(W_dec, n=s.n_neighbours), strength=strengths(sae), labels=parse_labels(labels))
    if hf is not None:
        d.logits = logit_extremes(W_dec, hf, n=s.n_logits)
    return d


def pair_up(a: SAEData, b: SAEData) -> None:
    """Each feature's best decoder-cosine match in the other dictionary (both ways)."""
    if a.sae.cfg.d_in != b.sae.cfg.d_in:
        return
    Wa, Wb = a.sae.W_dec.detach().float(), b.sae.W_dec.detach().float()
    a.match, a.other = nearest(Wa, Wb, n=1), b.name
    b.match, b.other = nearest(Wb, Wa, n=1), a.name


class Tokens:
    """Token id -> display string, decoded once per id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        i = int(i)
        if i not in self.cache:
            self.cache[i] = self.tok.decode([i]) if self.tok is not None else f"<{i}>"
        return self.cache[i]


def _context(d: SAEData, f: int, m: int, s: Settings, tokens: Tokens) -> dict[str, Any]:
    """One shown context around active pair m of latent f: tokens, f's code on each, and for a TRSAE the
    pre-activation's terms and the context read's weight on each earlier token."""
    p = d.p
    n = int(p.row_M[m])
    j, t = divmod(n, p.T)
    enc = d.sae.encoder
    temporal = isinstance(enc, TRSAEEncoder)
    left = min(max(s.left, enc.window if temporal else 0), 32)
    lo, hi = max(t - left, 0), min(t + s.right + 1, p.T)
    sl = p.pairs(f)
    rows_f = p.row_M[sl]  # sorted by code; find this window's rows among them
    hit = np.nonzero((rows_f >= j * p.T + lo) & (rows_f < j * p.T + hi))[0]
    acts = [0] * (hi - lo)
    for h in hit:
        acts[int(rows_f[h]) - j * p.T - lo] = r3(p.code_M[sl.start + h])
    out = {"seq": int(p.seq_N[n]), "t": t, "i": t - lo, "tok": [tokens(x) for x in p.ids_N[j * p.T + lo:j * p.T + hi]],
           "act": acts}
    if temporal:
        out["terms"] = [r3(x) for x in p.terms_M3[m]]
        w = window_weights(p.fq_NK[j * p.T:(j + 1) * p.T], p.fk_NK[j * p.T:(j + 1) * p.T],
                           p.mask_N[j * p.T:(j + 1) * p.T], t, enc.window, causal=enc.cfg.causal)
        out["attn"] = [r2(w.get(u, 0.0)) for u in range(lo, hi)]
    return out


def feature_record(d: SAEData, f: int, s: Settings, tokens: Tokens) -> dict[str, Any]:
    """Everything the feature page of latent f shows (JSON-ready)."""
    p = d.p
    top, bands = pick_examples(d.p, f, s.n_top, s.n_bands, s.per_band, s.seed)
    rec: dict[str, Any] = {
        "sae": d.name, "f": f, "density": r3(d.density_F[f]), "n_active": int(p.start_F[f + 1] - p.start_F[f]),
        "max": r3(d.max_F[f]), "labels": [[a, r2(b)] for a, b in d.labels.get(f, [])],
        "hist": {"max": r3(d.max_F[f]), "counts": d.hist_FB[f].tolist()},
        "pos": {"start": d.pos_start_P.tolist(), "mean": [r3(x) for x in d.pos_mean_FP[f]],
                "rate": [r3(x) for x in d.pos_rate_FP[f]]},
        "top": [_context(d, f, m, s, tokens) for m in top],
        "bands": [{"band": b, "ctx": [_context(d, f, m, s, tokens) for m in ms]} for b, ms in bands],
        "nbrs": [[int(i), r2(c)] for i, c in zip(d.nbr[0][f].tolist(), d.nbr[1][f].tolist())],
        "match": None, "other": d.other, "logits": None, "temporal": None,
    }
    if d.match is not None:
        rec["match"] = [int(d.match[0][f, 0]), r2(d.match[1][f, 0])]
    if d.logits is not None:
        ti, tv, bi, bv = (x[f].tolist() for x in d.logits)
        rec["logits"] = {"top": [[tokens(i), r3(v)] for i, v in zip(ti, tv)],
                         "bottom": [[tokens(i), r3(v)] for i, v in zip(bi, bv)]}
    if d.strength is not None:
        enc = d.sae.encoder
        terms = p.terms_M3[p.pairs(f)]
        rec["temporal"] = {
            "ctx_strength": r3(d.strength[0][f]), "pos_strength": r3(d.strength[1][f]), "window": enc.window,
            "mean_terms": [r3(x) for x in terms.mean(0)] if len(terms) else [0, 0, 0],
            "P": [r3(x) for x in enc.P[f].tolist()] if enc.cfg.use_pos else [],
        }
    return rec


def buckets(sae: SAE) -> list[list[int]]:
    """[first, last] position of each TRSAE position bucket (last -1: open-ended); [] without buckets."""
    enc = sae.encoder
    if not isinstance(enc, TRSAEEncoder) or not enc.cfg.use_pos:
        return []
    return [list(b) for b in bucket_bounds(enc.cfg.n_exact_pos, enc.cfg.n_buckets, enc.cfg.pos_max)]


def index_rows(d: SAEData, tokens: Tokens, n_tokens: int = 4) -> list[list]:
    """One row per latent, fields as `INDEX_COLUMNS`."""
    p = d.p
    rows = []
    for f in range(p.width):
        sl = p.pairs(f)
        seen: list[str] = []
        for n in p.row_M[sl]:  # most active first
            w = tokens(p.ids_N[n]).strip()
            if w and w not in seen:
                seen.append(w)
            if len(seen) == n_tokens:
                break
        best = d.labels.get(f, [(None, None)])[0]
        rows.append([f, r3(d.density_F[f]), r3(d.max_F[f]), best[0], None if best[1] is None else r2(best[1]),
                     None if d.strength is None else r3(d.strength[0][f]),
                     None if d.strength is None else r3(d.strength[1][f]),
                     None if d.match is None else int(d.match[0][f, 0]),
                     None if d.match is None else r2(d.match[1][f, 0]), " ".join(seen)])
    return rows


def records(d: SAEData, s: Settings, tokens: Tokens) -> Iterator[dict[str, Any]]:
    for f in range(d.p.width):
        yield feature_record(d, f, s, tokens)

