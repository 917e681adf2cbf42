"""The T-SAE encoder (Bhalla, Oesterling, Verdun, Lakkaraju & Calmon, "Temporal Sparse Autoencoders", ICLR 2026):
the per-token encoder, plus a contrastive loss that pulls together the codes of two tokens of one context on a
"high-level" share of the latents (the first ``high_frac`` of the dictionary; the paper splits 20 : 80).

T-SAE pairs this with a Matryoshka BatchTopK sparsity whose inner level is that high-level share, so the first
latents must also reconstruct on their own (`trsae.experiments.field_specs` builds it with ``prefix_fracs=[0.2]``
and the reference's level weights). Inference is per-token: the loss shapes the dictionary, not how a code is
computed.

Ported from the authors' code, ``AI4LIFE-GROUP/temporal-saes`` at commit 8daecb2
(``dictionary_learning/dictionary_learning/trainers/temporal_sequence_top_k.py``, ``TemporalMatryoshkaBatchTopK
Trainer.loss``; pairs from ``buffer.py`` with ``--temporal r``; settings from ``train_temporal.py``). There, on raw
activations x (no input normalisation),

    loss = 1/2 [0.2 E||x - x_hat_inner||^2 + 0.8 E||x - x_hat||^2] + auxk_alpha aux + 0.1 C,
    C = 1/2 [CE(h h'^T, I) + CE(h' h^T, I)],

with h the high-level codes of each token, h' those of its pair — a uniformly random earlier token of the same
context (BOS removed) — and the logits raw dot products over all pairs of the batch. This project's loss has the
per-dimension MSE of inputs scaled by s (``E||s x||^2 = d``) at weight 1, so the same objective divided by
``0.4 d / s^2`` is

    mse + 0.25 inner + (0.1 / 0.4) (s^2 / d) C(h_s / s),

where h_s = s h are the codes of the scaled input: ``contrast_coeff = 0.25`` with ``logits="dot"`` computes that
(`EncState.input_scale` carries s), and the Matryoshka part's ``level_weights=[0.25]`` the inner term.

Kept different, and why:

- Negatives: the reference's batches come from a shuffled buffer of about a thousand contexts, so a pair's
  negatives are almost all other contexts; a batch here holds few sequences, so pairs of the same sequence are not
  negatives of each other (the positive stays).
- AuxK keeps this project's weight (`trsae.saes.sparsity`): the reference's 1/32 of a unit-free term beside a
  squared error summed over raw dimensions vanishes on gemma's residual norms; keeping it favours T-SAE.
- Gradient clipping at norm 1 and the reference's learning rate (3e-4 with 1,000 warm-up steps) are not copied:
  every SAE here trains with one optimiser schedule, tuned the same way for all.

``logits="cosine"`` keeps the paper's description (InfoNCE on cosine similarities over ``temperature``, pairs with
an all-zero code dropped), with ``contrast_coeff`` then the term's weight as it stands; ``pairs="adjacent"``
pairs each token with the one before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as tnf
from torch import Tensor

from trsae.saes.config import PartConfig, check_float, register_part
from trsae.saes.encoders import EncState, TokenEncoder


@dataclass
class TSAEEncoderConfig(PartConfig):
    """The T-SAE's contrastive term (the encoder itself is per-token)."""

    high_frac: float = 0.2
    """Share of the latents (the first ones) that are "high-level" and enter the contrastive loss."""
    contrast_coeff: float = 0.25
    """Weight of the contrastive loss beside the MSE. With ``logits="dot"`` it is converted from the reference's
    units (module docstring): 0.25 is the reference's 0.1 over the 0.4 weight of its outer reconstruction level."""
    logits: str = "dot"
    """"dot": raw dot products of the codes of raw activations (the reference); "cosine": cosine similarity over
    `temperature` (the paper's description)."""
    temperature: float = 0.1
    """Temperature of the cosine logits (unused by "dot")."""
    pairs: str = "random"
    """Each token's positive: "random" (a uniformly random earlier valid token of its sequence, as the reference's
    ``--temporal r``) or "adjacent" (the token before it)."""

    def validate(self) -> None:
        check_float("high_frac", self.high_frac)
        if not 0 < self.high_frac <= 1:
            raise ValueError(f"high_frac={self.high_frac} must be in (0, 1]")
        check_float("contrast_coeff", self.contrast_coeff, lo=0.0)
        check_float("temperature", self.temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.logits not in ("dot", "cosine"):
            raise ValueError(f"logits must be 'dot' or 'cosine', got {self.logits!r}")
        if self.pairs not in ("random", "adjacent"):
            raise ValueError(f"pairs must be 'random' or 'adjacent', got {self.pairs!r}")

    def n_high(self, width: int) -> int:
        return max(1, round(self.high_frac * width))


def token_pairs(mask_N: Tensor, B: int, T: int, how: str, gen: torch.Generator | None = None,
                ctx_N: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(rows of each anchor, rows of its positive, sequence of each pair) over B sequences of T tokens: every valid
    token (`mask_N`) with an earlier context token (`ctx_N`, default `mask_N`) in its sequence; the positive is the
    previous token ("adjacent", which must be a context token) or one of the earlier context tokens drawn uniformly
    with `gen` ("random")."""
    mask_BT = mask_N.reshape(B, T)
    ctx_BT = mask_BT if ctx_N is None else ctx_N.reshape(B, T)
    if how == "adjacent":
        ok_BT = mask_BT.clone()
        ok_BT[:, 1:] &= ctx_BT[:, :-1]
        ok_BT[:, 0] = False
        rows_P = ok_BT.reshape(-1).nonzero().squeeze(1)
        return rows_P, rows_P - 1, rows_P // T
    before_BT = torch.cumsum(ctx_BT.long(), dim=1) - ctx_BT.long()  # context tokens strictly before t
    ok_BT = mask_BT & (before_BT > 0)
    rows_P = ok_BT.reshape(-1).nonzero().squeeze(1)
    seq_P = rows_P // T
    u_P = torch.rand(rows_P.numel(), generator=gen, dtype=torch.float64).to(rows_P.device)
    pick_P = (u_P * before_BT.reshape(-1)[rows_P]).long()  # the pick-th earlier context token (0-based)
    valid_first_BT = torch.sort((~ctx_BT).long(), dim=1, stable=True).indices  # context positions first, in order
    pos_P = valid_first_BT[seq_P, pick_P]
    return rows_P, seq_P * T + pos_P, seq_P


def contrastive_loss(h_NH: Tensor, anchors_P: Tensor, positives_P: Tensor, seq_P: Tensor, logits: str,
                     temperature: float = 1.0, logit_scale: float = 1.0) -> Tensor:
    """Symmetric InfoNCE over the pairs (`anchors_P`, `positives_P`) of the codes ``h_NH``: the logits between
    pair i's anchor and pair j's positive are ``logit_scale h_a . h_p`` ("dot") or their cosine over
    `temperature`; pairs of the same sequence are not negatives of each other. 0 with fewer than two sequences."""
    a_PH, p_PH = h_NH[anchors_P], h_NH[positives_P]
    if logits == "cosine":
        keep_P = (a_PH.detach().abs().sum(1) > 0) & (p_PH.detach().abs().sum(1) > 0)
        a_PH, p_PH, seq_P = tnf.normalize(a_PH[keep_P], dim=1), tnf.normalize(p_PH[keep_P], dim=1), seq_P[keep_P]
    if seq_P.numel() == 0 or int(seq_P.unique().numel()) < 2:
        return h_NH.sum() * 0.0
    s_PP = a_PH @ p_PH.T * (logit_scale if logits == "dot" else 1.0 / temperature)
    same_PP = seq_P[:, None] == seq_P[None, :]
    same_PP.fill_diagonal_(False)  # the positive stays; other pairs of the same sequence are no negatives
    s_PP = s_PP.masked_fill(same_PP, float("-inf"))
    target_P = torch.arange(s_PP.shape[0], device=s_PP.device)
    return 0.5 * (tnf.cross_entropy(s_PP, target_P) + tnf.cross_entropy(s_PP.T, target_P))


@register_part("encoder", "tsae", TSAEEncoderConfig)
class TSAEEncoder(TokenEncoder):
    """The per-token encoder with T-SAE's contrastive loss on the first `n_high` latents. The random pairs of a
    training step are drawn from a generator seeded with the step (`on_step`), so a step's loss is a function of
    the weights, the batch and the step, and a resumed run draws the same pairs."""

    cfg: TSAEEncoderConfig
    reads_context = True  # its loss pairs a token with an earlier one

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.step = 0

    def on_step(self, step: int, total_steps: int) -> None:
        self.step = step

    @classmethod
    def flops(cls, cfg, mode, dense, ctx_len=None, n_tokens=None):
        """`TokenEncoder.flops` plus, in the loss (modes "forward" and "train"), the contrastive logits between
        every anchor and every positive of a step, ``2 P^2 H`` with ``P`` pairs (at most ``n_tokens``, taken as
        that) over the H high-level latents, and their backward ``4 P^2 H``: per step, since it grows with the
        step's tokens."""
        tok, bwd, step = super().flops(cfg, mode, dense, ctx_len, n_tokens)
        if mode == "encode" or cfg.encoder.contrast_coeff == 0:
            return tok, bwd, step
        if n_tokens is None:
            raise ValueError("T-SAE's contrastive term grows with the tokens of a step: pass n_tokens")
        pairs2_h = n_tokens ** 2 * cfg.encoder.n_high(cfg.width)
        step["contrastive"] = (6 if mode == "train" else 2) * pairs2_h
        return tok, bwd, step

    def losses(self, st: EncState, W_dec_FD: Tensor, codes=None) -> dict[str, Tensor]:
        if codes is None or self.cfg.contrast_coeff == 0:
            return {"contrast": st.x_ND.new_zeros(())}
        H = self.cfg.n_high(W_dec_FD.shape[0])
        N = st.x_ND.shape[0]
        if codes.dense_NF is not None:
            h_NH = codes.dense_NF[:, :H]
        else:
            keep_M = codes.cols_M < H
            h_NH = st.x_ND.new_zeros(N, H).index_put((codes.rows_M[keep_M], codes.cols_M[keep_M]),
                                                     codes.vals_M[keep_M], accumulate=True)
        gen = torch.Generator().manual_seed(self.step)
        anchors_P, positives_P, seq_P = token_pairs(st.mask_N, st.B, st.T, self.cfg.pairs, gen, st.ctx_N)
        weight = self.cfg.contrast_coeff
        scale = 1.0
        if self.cfg.logits == "dot":  # codes of raw activations are h / s; the term's weight converts by s^2 / d
            s2 = st.input_scale ** 2
            weight, scale = weight * s2 / st.x_ND.shape[1], 1.0 / s2
        return {"contrast": weight * contrastive_loss(h_NH, anchors_P, positives_P, seq_P, self.cfg.logits,
                                                      self.cfg.temperature, scale)}
