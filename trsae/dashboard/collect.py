"""One pass of an SAE over a store's split: every active (token, latent) pair with its code, and for a TRSAE the
three terms of its pre-activation; then per-feature summaries from those pairs.

Shapes: N tokens collected (whole sequences of T, in collection order: token n is position n % T of collected
sequence n // T), F latents, M active pairs, K = d_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trsae.saes import SAE
from trsae.saes.context import feature_map
from trsae.saes.trsae import TRSAEEncoder
from trsae.store import ActivationStore


@dataclass
class Pass:
    """What one SAE did on the collected tokens (numpy, sorted by latent, then by code descending)."""

    ids_N: np.ndarray
    """Token ids [N]."""
    mask_N: np.ndarray
    """True on ordinary tokens [N] (False on BOS and other special tokens: never active, never counted)."""
    seq_N: np.ndarray
    """Store sequence index of each token [N]."""
    T: int
    """Tokens per collected sequence."""
    row_M: np.ndarray
    """Token index n of each active pair [M]."""
    feat_M: np.ndarray
    """Latent of each active pair [M]."""
    code_M: np.ndarray
    """Code (activation) of each active pair [M]."""
    start_F: np.ndarray
    """Pairs of latent f are ``start_F[f]:start_F[f + 1]`` [F + 1]."""
    terms_M3: np.ndarray | None = None
    """TRSAE only: (token, position, context) terms of the pre-activation at each pair [M, 3]."""
    fq_NK: np.ndarray | None = None
    """TRSAE only: feature-mapped attention queries [N, K]."""
    fk_NK: np.ndarray | None = None
    """TRSAE only: feature-mapped attention keys [N, K]."""

    @property
    def width(self) -> int:
        return len(self.start_F) - 1

    @property
    def pos_N(self) -> np.ndarray:
        return np.arange(len(self.ids_N)) % self.T

    def pairs(self, f: int) -> slice:
        return slice(int(self.start_F[f]), int(self.start_F[f + 1]))


def temporal_terms(enc: TRSAEEncoder, st, rows_M: Tensor, cols_M: Tensor) -> Tensor:
    """(token, position, context) terms of ``z[rows, cols]`` from an encoder state of `TRSAEEncoder.prepare`
    [M, 3]: ``W_enc[:, f] . x + bias_f``, ``P[f, bucket(t)]`` and ``g_f U_f . ctx_t`` (with per-token gates
    ``sigmoid(a_f + G_f . q_t)``), each computed on its own, not taken from the fused `dense`."""
    ex = st.extra
    tok_M = (st.x_ND[rows_M] * enc.W_enc.T[cols_M]).sum(1) + st.bias_F[cols_M]
    pos_M = enc.P[cols_M, ex["bucket_N"][rows_M]] if "bucket_N" in ex else torch.zeros_like(tok_M)
    if "ctx_NC" in ex:
        read_M = (ex["ctx_NC"][rows_M] * enc.U[cols_M]).sum(1)
        if "q_NK" in ex:
            g_M = torch.sigmoid(enc.gate_logit[cols_M] + (ex["q_NK"][rows_M] * enc.G[cols_M]).sum(1))
        else:
            g_M = enc.gates()[cols_M]
        ctx_M = g_M * read_M
    else:
        ctx_M = torch.zeros_like(tok_M)
    return torch.stack([tok_M, pos_M, ctx_M], dim=1)


@torch.no_grad()
def collect(sae: SAE, store: ActivationStore, split: str = "test", max_tokens: int = 1 << 16,
            batch_seqs: int = 8) -> Pass:
    """Encode whole sequences of `split` (in store order, up to `max_tokens` tokens) and keep the active pairs."""
    sae = sae.eval()
    enc = sae.encoder
    temporal = isinstance(enc, TRSAEEncoder)
    T = store.ctx_len
    max_seqs = max(1, max_tokens // T)
    ids, masks, seqs, rows, feats, codes, terms, fqs, fks = ([] for _ in range(9))
    n = 0
    for b in store.first(split, max_seqs, batch_seqs):
        st, codes_NF = sae.encode_state(b.acts_BTD, b.pos_BT, b.mask_BT)
        # the SAE's codes as SAE.encode gives them: novel plus predicted, where the encoder predicts
        codes_NF = (codes_NF if st.pred_NF is None else codes_NF + st.pred_NF) * st.mask_N[:, None]
        r_M, c_M = codes_NF.nonzero(as_tuple=True)
        rows.append((r_M + n).numpy().astype(np.int64))
        feats.append(c_M.numpy().astype(np.int32))
        codes.append(codes_NF[r_M, c_M].numpy())
        if temporal:
            terms.append(temporal_terms(enc, st, r_M, c_M).numpy())
            fq, fk = attention_features(enc, st.x_ND)
            fqs.append(fq.numpy())
            fks.append(fk.numpy())
        ids.append(b.ids_BT.reshape(-1).numpy())
        masks.append(st.mask_N.numpy())
        seqs.append(np.repeat(b.seq_B.numpy(), T))
        n += len(b.seq_B) * T
    if n == 0:
        raise ValueError(f"the {split} split of {store.path} holds no sequences to build a dashboard from")
    row_M, feat_M, code_M = np.concatenate(rows), np.concatenate(feats), np.concatenate(codes)
    order = np.lexsort((-code_M, feat_M))
    F = sae.cfg.width
    start_F = np.concatenate([[0], np.cumsum(np.bincount(feat_M, minlength=F))])
    cat = (lambda xs, o=None: None if not xs else (np.concatenate(xs) if o is None else np.concatenate(xs)[o]))
    return Pass(ids_N=np.concatenate(ids), mask_N=np.concatenate(masks), seq_N=np.concatenate(seqs), T=T,
                row_M=row_M[order], feat_M=feat_M[order], code_M=code_M[order], start_F=start_F,
                terms_M3=cat(terms, order), fq_NK=cat(fqs), fk_NK=cat(fks))


def attention_features(enc: TRSAEEncoder, x_ND: Tensor) -> tuple[Tensor, Tensor]:
    """Feature-mapped queries and keys of the TRSAE's context read [N, K] each (zeros when it has no attention)."""
    c = enc.cfg
    if not c.use_attn:
        z = x_ND.new_zeros(x_ND.shape[0], c.d_k)
        return z, z
    q_NK, k_NK, _ = (x_ND @ enc.W_qkv).split([c.d_k, c.d_k, c.d_v], dim=-1)
    return feature_map(q_NK), feature_map(k_NK)


def window_weights(fq_TK: np.ndarray, fk_TK: np.ndarray, mask_T: np.ndarray, t: int, window: int,
                   causal: bool = True) -> dict[int, float]:
    """Weight ``a_s = (q_t . k_s) / sum_s' (q_t . k_s')`` that token t's context read gives each valid key s
    (s in t-w .. t-1, or t-w .. t+w minus t without `causal`; masked tokens are no keys), as {s: a_s}. The
    context is ``sum_s a_s v_s`` (`trsae.saes.context.naive_window_attention`, whose loop this mirrors)."""
    T = len(mask_T)
    if causal:
        idx = range(max(t - window, 0), t)
    else:
        idx = [s for s in range(max(t - window, 0), min(t + window + 1, T)) if s != t]
    keep = [s for s in idx if mask_T[s]] if window > 0 else []
    if not keep:
        return {}
    scores = fk_TK[keep] @ fq_TK[t]
    return {s: float(a) for s, a in zip(keep, scores / scores.sum())}


# --------------------------------------------------------------------------------------------- summaries


def densities(p: Pass) -> np.ndarray:
    """Fraction of ordinary tokens on which each latent is active [F]."""
    return np.diff(p.start_F) / max(int(p.mask_N.sum()), 1)


def histograms(p: Pass, bins: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """(max code [F], counts [F, bins] of the codes in ``bins`` equal bins over (0, max])."""
    F = p.width
    max_F = np.zeros(F, dtype=np.float32)
    has = np.diff(p.start_F) > 0
    max_F[has] = p.code_M[p.start_F[:-1][has]]  # pairs are sorted by code, descending, within a latent
    scale_M = np.where(max_F[p.feat_M] > 0, p.code_M / np.maximum(max_F[p.feat_M], 1e-30), 0.0)
    bin_M = np.clip((scale_M * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(p.feat_M.astype(np.int64) * bins + bin_M, minlength=F * bins).reshape(F, bins)
    return max_F, counts


def position_profile(p: Pass, max_bins: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first position of each bin [P], mean code [F, P] over ordinary tokens of the bin, firing rate [F, P]);
    positions are binned into at most `max_bins` equal bins."""
    width = -(-p.T // max_bins)
    n_bins = -(-p.T // width)
    bin_N = p.pos_N // width
    valid_P = np.bincount(bin_N[p.mask_N], minlength=n_bins).astype(np.float64)
    idx = p.feat_M.astype(np.int64) * n_bins + bin_N[p.row_M]
    total = np.bincount(idx, weights=p.code_M, minlength=p.width * n_bins).reshape(p.width, n_bins)
    fires = np.bincount(idx, minlength=p.width * n_bins).reshape(p.width, n_bins)
    denom = np.maximum(valid_P, 1)[None]
    return np.arange(n_bins) * width, total / denom, fires / denom


def pick_examples(p: Pass, f: int, n_top: int = 10, n_bands: int = 4, per_band: int = 3,
                  seed: int = 0) -> tuple[list[int], list[tuple[str, list[int]]]]:
    """Pair indices to show for latent f: the top `n_top` codes, and `per_band` random pairs from each of
    `n_bands` bands of its active codes by rank (quantiles of its activation distribution), lowest band first."""
    sl = p.pairs(f)
    n = sl.stop - sl.start
    top = list(range(sl.start, sl.start + min(n_top, n)))
    rng = np.random.default_rng([seed, f])
    bands = []
    edges = np.linspace(0, n, n_bands + 1).round().astype(int)
    for i in range(n_bands):  # rank 0 is the largest code: band i from the bottom is the slice from the end
        lo, hi = n - edges[i + 1], n - edges[i]
        pool = np.arange(sl.start + lo, sl.start + hi)
        if len(pool):
            pick = np.sort(rng.choice(pool, size=min(per_band, len(pool)), replace=False))
            q0, q1 = round(100 * i / n_bands), round(100 * (i + 1) / n_bands)
            bands.append((f"{q0}–{q1}%", pick.tolist()))
    return top, bands
