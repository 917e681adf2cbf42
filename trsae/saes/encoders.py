"""Encoder parts: what maps a window of activations ``x_BTD`` to pre-activations ``z_NF``.

The per-token encoder ("token") is the affine map of every standard SAE, ``z = W_enc^T (x - b_dec) + b_enc``,
computed as ``x @ W_enc + (b_enc - b_dec @ W_enc)`` (the same function, but the backward pass never needs a
full ``[N, F] x [F, D]`` product). A temporal encoder subclasses it and adds terms that depend on position and
on earlier tokens (`trsae.saes.trsae`).

An encoder serves two paths: `dense` gives ``z_NF`` for every token and latent with autograd; `at_pairs`
re-attaches ``z`` at the active (token, latent) pairs a sparsity selected, with the same gradients as `dense`
through a sparse backward (`trsae.saes.sparse_ops.PairPreacts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trsae.saes.config import PartConfig, register_part
from trsae.saes.sparse_ops import PairPreacts


@dataclass
class EncState:
    """Per-batch encoder inputs shared by the dense and the sparse paths (an encoder adds to `extra`)."""

    x_ND: Tensor
    bias_F: Tensor  # b_enc - b_dec @ W_enc
    mask_N: Tensor
    B: int
    T: int
    extra: dict[str, Any] = field(default_factory=dict)
    pred_NF: Tensor | None = None
    """Predicted codes (dense) of an encoder that predicts part of the code from earlier tokens (TFA, a TRSAE
    with ``pred_k``): decoded through the same dictionary, added to the sparsity's (novel) codes and counted in
    L0. None for every other encoder."""
    pred_ND: Tensor | None = None
    """``pred_NF @ W_dec`` (no b_dec), computed once by the encoder."""
    ctx_N: Tensor | None = None
    """Tokens an encoder may read as context where that is not `mask_N` (a training crop's left margin: read, not
    trained on); None: `mask_N`."""
    input_scale: float = 1.0
    """`SAEConfig.input_scale` s (the inputs here are s x): loss terms defined on raw activations convert with it."""
    xin_ND: Tensor | None = None
    """What the per-token term reads when it is not `x_ND`: the input less the decoded prediction, so the novel
    code encodes what the prediction leaves. `x_ND` stays the reconstruction target."""

    @property
    def context_N(self) -> Tensor:
        return self.mask_N if self.ctx_N is None else self.ctx_N

    @property
    def enc_in_ND(self) -> Tensor:
        return self.x_ND if self.xin_ND is None else self.xin_ND


@dataclass
class TokenEncoderConfig(PartConfig):
    """The per-token affine encoder: no settings."""


@register_part("encoder", "token", TokenEncoderConfig)
class TokenEncoder(nn.Module):
    """``W_enc [D, F]`` (the transposed decoder at init) and ``b_enc [F]`` (zero)."""

    config_class: type[PartConfig]

    def __init__(self, cfg: PartConfig, d_in: int, width: int, W_dec_FD: Tensor, gen: torch.Generator):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(W_dec_FD.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(width))

    predicts = False
    """True for an encoder that sets `EncState.pred_NF` (it then needs `W_dec_FD` in `prepare`)."""

    reads_context = False
    """True for an encoder (or its loss) that reads other tokens than the one it encodes: only such an encoder
    is given a training crop's left margin (`trsae.config.TrainConfig.context`)."""

    encodes_context = False
    """True for an encoder whose codes at inference depend on other tokens (not T-SAE's, whose contrastive loss
    reads pairs in training only): a per-token tool cannot run it (`trsae.interchange.export_saelens`)."""

    @classmethod
    def flops(cls, cfg: Any, mode: str, dense: bool, ctx_len: int | None = None,
              n_tokens: int | None = None) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """This encoder's FLOPs in the model of `trsae.overhead.flops`, for the SAE config ``cfg`` in ``mode``
        "encode", "forward" or "train": (per token forward, per token backward, per step). ``dense``: the
        sparsity's codes are dense, so every latent (not k) gets a gradient; ``ctx_len`` and ``n_tokens`` (tokens
        per step) for the parts whose cost depends on them. Here: ``x @ W_enc`` 2DF, its sparse or dense
        backward, and the bias fold ``b_enc - b_dec @ W_enc`` once a step."""
        D, F = cfg.d_in, cfg.width
        train = mode == "train"
        k = getattr(cfg.sparsity, "k", F)
        bwd = {"encoder_bwd": 2 * D * F if dense else 2 * k * D} if train else {}
        return {"encoder": 2 * D * F}, bwd, {"bias_fold": (6 if train else 2) * D * F}

    def prepare(self, x_BTD: Tensor, pos_BT: Tensor | None, mask_BT: Tensor | None, b_dec_D: Tensor,
                W_dec_FD: Tensor | None = None, ctx_BT: Tensor | None = None) -> EncState:
        """The batch's state. ``mask_BT``: the tokens encoded for the loss and the metrics; ``ctx_BT``: the tokens a
        temporal encoder may read as context, where they differ (None: ``mask_BT``)."""
        B, T, D = x_BTD.shape
        if D != self.W_enc.shape[0]:
            raise ValueError(f"expected inputs [B, T, {self.W_enc.shape[0]}], got {tuple(x_BTD.shape)}")
        if mask_BT is None:
            mask_N = torch.ones(B * T, dtype=torch.bool, device=x_BTD.device)
        else:
            mask_N = mask_BT.reshape(B * T).bool()
        bias_F = self.b_enc - b_dec_D @ self.W_enc
        ctx_N = None if ctx_BT is None else ctx_BT.reshape(B * T).bool()
        return EncState(x_BTD.reshape(B * T, D), bias_F, mask_N, B, T, ctx_N=ctx_N)

    def dense(self, st: EncState) -> Tensor:
        """``z_NF`` for every token and latent (autograd-capable), in the parameters' dtype: under
        `torch.autocast` the product runs in the autocast dtype and comes back here, so that the selection, the
        decode and the sparse backward run as without it (`trsae.device`)."""
        return torch.addmm(st.bias_F, st.enc_in_ND, self.W_enc).to(self.W_enc.dtype)

    def at_pairs(self, st: EncState, z_NF: Tensor, rows_M: Tensor, cols_M: Tensor,
                 segs: tuple[int, ...]) -> Tensor:
        """``z_NF[rows, cols]`` re-attached to the graph (same values, the gradients of `dense`).
        `segs`: sizes of the consecutive row-sorted runs of pairs."""
        return PairPreacts.apply(z_NF, rows_M, cols_M, segs, st.enc_in_ND, self.W_enc, st.bias_F,
                                 *self.pair_terms(st))

    def pair_terms(self, st: EncState) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """(ctx_NC, U_FC, P_FB, bucket_N): the low-rank and positional terms of z (None here)."""
        return None, None, None, None

    def losses(self, st: EncState, W_dec_FD: Tensor, codes: Any = None) -> dict[str, Tensor]:
        """The encoder's own weighted loss terms (none here); `codes` are the sparsity's `Codes` of the batch."""
        return {}

    def scale_latents_(self, scale_F: Tensor) -> None:
        """Multiply every term of latent f by scale_F[f] (with the decoder divided by it, the SAE is unchanged)."""
        self.W_enc.mul_(scale_F[None, :])
        self.b_enc.mul_(scale_F)

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, learning-rate multiplier) of the parameters that do not train at the base rate."""
        return []

    def on_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer before each step (a curriculum hook)."""

    def log_stats(self) -> dict[str, float]:
        """Values the trainer adds to each log line."""
        return {}
