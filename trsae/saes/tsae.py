"""The T-SAE encoder (Bhalla, Oesterling, Verdun, Lakkaraju & Calmon, "Temporal Sparse Autoencoders", ICLR 2026):
the per-token encoder, plus a contrastive loss that pulls the codes of adjacent tokens together on a "high-level"
share of the latents (the first ``high_frac`` of the dictionary; the paper splits 20 : 80).

T-SAE pairs this with a Matryoshka BatchTopK sparsity whose inner level is that high-level share, so the first
latents must also reconstruct on their own (`trsae.experiments.temporal_specs` builds it with
``prefix_fracs=[high_frac]``). Inference is per-token: the loss shapes the dictionary, not how a code is computed.

The contrastive term is InfoNCE on cosine similarities, as the paper describes it. This port was written from the
paper; the authors' code is now public (``AI4LIFE-GROUP/temporal-saes``, ``dictionary_learning/dictionary_learning/
trainers/temporal_sequence_top_k.py``) and differs from it: there the loss is the squared error summed over the
dimensions of raw activations plus 0.1 x the contrastive term, its logits are raw dot products (no cosine, no
temperature), the Matryoshka levels are weighted 0.2 : 0.8, and gradients are clipped at 1 (issue #25 aligns the
port with it; until then the paper's T-SAE row measures this port's settings). For
every valid adjacent pair (t-1, t) of a sequence whose high-level codes are both non-zero, the anchor is
``h_t / ||h_t||`` and its positive ``h_{t-1} / ||h_{t-1}||``; the negatives are the positives of the pairs of OTHER
sequences in the batch ("tokens from other samples"). With ``s_ij = a_i . p_j / temperature`` over the pairs the
loss is the mean of both directions' cross-entropies ``-log softmax_j(s_ij)[i]``, times ``contrast_coeff``.

The paper's weight of the term was not available here. ``contrast_coeff`` = 0.05 is set by hand, not tuned:
at chance the term is about log(number of negatives), ~7 for a batch of 8 sequences of 128 tokens, so it starts
at about a third of the reconstruction loss of an untrained SAE (FVU 1 on inputs scaled to E||x||^2 = d).
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
    contrast_coeff: float = 0.05
    """Weight of the contrastive loss."""
    temperature: float = 0.1
    """Temperature of the InfoNCE softmax over cosine similarities."""

    def validate(self) -> None:
        check_float("high_frac", self.high_frac)
        if not 0 < self.high_frac <= 1:
            raise ValueError(f"high_frac={self.high_frac} must be in (0, 1]")
        check_float("contrast_coeff", self.contrast_coeff, lo=0.0)
        check_float("temperature", self.temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")

    def n_high(self, width: int) -> int:
        return max(1, round(self.high_frac * width))


def adjacent_pairs(mask_N: Tensor, B: int, T: int) -> tuple[Tensor, Tensor]:
    """(rows of t, sequence of each) for every t >= 1 whose token and previous token are both valid."""
    n_N = torch.arange(B * T, device=mask_N.device)
    ok_N = (n_N % T != 0) & mask_N & torch.roll(mask_N, 1)
    rows_P = ok_N.nonzero().squeeze(1)
    return rows_P, rows_P // T


def contrastive_loss(h_NH: Tensor, mask_N: Tensor, B: int, T: int, temperature: float) -> Tensor:
    """The T-SAE InfoNCE term over the high-level codes ``h_NH`` of B sequences of T tokens (module docstring);
    0 when fewer than two sequences hold a usable pair."""
    rows_P, seq_P = adjacent_pairs(mask_N, B, T)
    a_PH, p_PH = h_NH[rows_P], h_NH[rows_P - 1]
    keep_P = (a_PH.detach().abs().sum(1) > 0) & (p_PH.detach().abs().sum(1) > 0)
    a_PH, p_PH, seq_P = a_PH[keep_P], p_PH[keep_P], seq_P[keep_P]
    if seq_P.numel() == 0 or int(seq_P.unique().numel()) < 2:
        return h_NH.sum() * 0.0
    a_PH, p_PH = tnf.normalize(a_PH, dim=1), tnf.normalize(p_PH, dim=1)
    s_PP = a_PH @ p_PH.T / temperature
    same_PP = seq_P[:, None] == seq_P[None, :]
    same_PP.fill_diagonal_(False)  # the positive stays; other pairs of the same sequence are no negatives
    s_PP = s_PP.masked_fill(same_PP, float("-inf"))
    target_P = torch.arange(s_PP.shape[0], device=s_PP.device)
    return 0.5 * (tnf.cross_entropy(s_PP, target_P) + tnf.cross_entropy(s_PP.T, target_P))


@register_part("encoder", "tsae", TSAEEncoderConfig)
class TSAEEncoder(TokenEncoder):
    """The per-token encoder with T-SAE's contrastive loss on the first `n_high` latents."""

    cfg: TSAEEncoderConfig

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
        return {"contrast": self.cfg.contrast_coeff * contrastive_loss(h_NH, st.mask_N, st.B, st.T,
                                                                       self.cfg.temperature)}
