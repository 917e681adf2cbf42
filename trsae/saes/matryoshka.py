"""Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2024): BatchTopK codes whose nested prefixes of the
dictionary must each reconstruct the input on their own, which pushes general, frequent features into the first
latents and curbs feature absorption.

Checked against SAELens 6.54.12 (``sae_lens/saes/matryoshka_batchtopk_sae.py``,
``MatryoshkaBatchTopKTrainingSAE.training_forward_pass``): the outer level is the ordinary loss, each inner level
``w`` adds the MSE of ``f[:, :w] @ W_dec[:w] + b_dec`` with the same codes, unweighted; the AuxK loss is the
BatchTopK one over the whole dictionary (SAELens's default ``use_matryoshka_aux_loss=False``). Inference is
BatchTopK's threshold rule. ``level_weights`` weighs the inner levels against the outer one (weight 1), for
trainers that weigh them (T-SAE's reference: 0.2 : 0.8, so 0.25, `trsae.saes.tsae`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from trsae.saes.config import check_float, register_part
from trsae.saes.sparse_ops import decode_pairs
from trsae.saes.sparsity import BatchTopK, BatchTopKConfig


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """BatchTopK with nested reconstruction losses."""

    prefix_fracs: list[float] = field(default_factory=lambda: [1 / 16, 1 / 8, 1 / 4, 1 / 2])
    """Inner levels as fractions of the width (strictly increasing, below 1); the outer level is the whole
    dictionary."""

    level_weights: list[float] | None = None
    """Weight of each inner level's MSE, the outer level's (the ordinary MSE) being 1. None -> 1 each (SAELens)."""

    def validate(self) -> None:
        super().validate()
        if self.level_weights is not None:
            self.level_weights = list(self.level_weights)
            if len(self.level_weights) != len(self.prefix_fracs):
                raise ValueError(f"level_weights {self.level_weights} needs one weight per inner level "
                                 f"(prefix_fracs {list(self.prefix_fracs)})")
            for i, w in enumerate(self.level_weights):
                check_float(f"level_weights[{i}]", w, lo=0.0)
        self.prefix_fracs = list(self.prefix_fracs)
        for i, frac in enumerate(self.prefix_fracs):
            check_float(f"prefix_fracs[{i}]", frac)
            if not 0 < frac < 1 or (i and frac <= self.prefix_fracs[i - 1]):
                raise ValueError(f"prefix_fracs must increase strictly within (0, 1), got {self.prefix_fracs}")

    def widths(self, width: int) -> list[int]:
        return [max(1, round(frac * width)) for frac in self.prefix_fracs]


@register_part("sparsity", "matryoshka", MatryoshkaConfig)
class Matryoshka(BatchTopK):
    """Matryoshka BatchTopK: inner losses ``inner_<w>`` for each prefix width w."""

    cfg: MatryoshkaConfig

    @classmethod
    def flops(cls, cfg, mode):
        """BatchTopK's, plus one decoding per inner level of the codes in its prefix: at most k pairs, counted as k
        (2kD a level; backward 4kD), so an upper bound."""
        tok, bwd, step = super().flops(cfg, mode)
        if mode == "encode":
            return tok, bwd, step
        levels, kD = len(cfg.sparsity.prefix_fracs), cfg.sparsity.k * cfg.d_in
        tok["inner_levels"] = 2 * kD * levels
        if mode == "train":
            bwd["inner_levels_bwd"] = 4 * kD * levels
        return tok, bwd, step

    def losses(self, st, codes, x_hat_ND, W_dec_FD, b_dec_D) -> dict[str, Tensor]:
        out = super().losses(st, codes, x_hat_ND, W_dec_FD, b_dec_D)
        N, D = st.x_ND.shape
        maskf_N = st.mask_N.to(st.x_ND.dtype)
        n_valid = maskf_N.sum().clamp_min(1.0)
        widths = self.cfg.widths(W_dec_FD.shape[0])
        for w, weight in zip(widths, self.cfg.level_weights or [1.0] * len(widths)):
            keep_M = codes.cols_M < w
            inner_ND = decode_pairs(codes.rows_M[keep_M], codes.cols_M[keep_M], codes.vals_M[keep_M], W_dec_FD, N)
            err_N = (inner_ND + b_dec_D - st.x_ND).pow(2).sum(1) / D
            out[f"inner_{w}"] = weight * (err_N * maskf_N).sum() / n_valid
        return out
