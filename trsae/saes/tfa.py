"""The TFA encoder ("Priors in Time", Lubana et al. 2025; reference ``eslubana/temporalSAEs`` at 6bd3827,
``sae/saeTemporal.py`` and ``sae/utils.py``): attention over the previous tokens' codes predicts the current
code; the sparse code encodes only what the prediction leaves.

For B sequences of T tokens, with ``xc_t = x_t - b_dec`` and the per-token encoder's dense codes
``u_t = ReLU(W_enc^T xc_t + b_enc)``::

    o_t      = softmax attention, query u_t, keys and values u_s of the valid tokens s < t (H heads)
    p_t      = ReLU(W_o o_t + b_o)                                   (dense, [F])
    s_t      = <W_dec^T p_t, xc_t> / ||W_dec^T p_t||^2               (projection of x onto the prediction)
    pred_t   = s_t p_t                                               (the predicted code)
    novel_t  = sparsity(W_enc^T (xc_t - W_dec^T pred_t) + b_enc)    (TopK: k codes)
    x_hat_t  = W_dec^T (pred_t + novel_t) + b_dec

Where the reference differs, for a CPU budget or for this harness:

- values are low rank (``W_v [F, d_v]``, then ``W_o [d_v, F]``); the reference's value and output maps are
  ``[F, F]`` each (its ``bottleneck_factor`` sets the query/key size only);
- one attention layer (the reference's default ``n_attn_layers`` = 1), no biases on queries, keys and values, and
  no prediction where no valid earlier token exists (the reference's first token attends to a zero context, whose
  value is the value bias); masked tokens (BOS) are no keys and get no prediction;
- the encoder is untied (``W_enc`` initialised to ``W_dec^T`` like every SAE here; the reference ties by default)
  and the inputs are already scaled to ``E||x||^2 = d`` (the reference multiplies by ``1 / (4 d)`` inside);
- ``pred_k``: None is TFA as published, a dense prediction whose every non-zero counts in this harness's L0
  (`trsae.evaluate` also reports the novel L0 alone, the number TFA publishes). An int keeps only the
  ``pred_k`` largest entries of ``p_t`` before the projection: a sparse, selective prediction that, with a TopK of
  ``k - pred_k`` novel codes, holds at most k codes a token.

The prediction is computed with autograd (dense ``[N, F]`` work: about four times a TopK step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as tnf
from torch import Tensor, nn

from trsae.saes.config import PartConfig, check_int, register_part
from trsae.saes.encoders import EncState, TokenEncoder


@dataclass
class TFAEncoderConfig(PartConfig):
    """The TFA predictor's settings (module docstring)."""

    n_heads: int = 4
    """Attention heads (reference config: 4)."""
    d_head: int = 16
    """Query / key size per head."""
    d_v: int = 128
    """Rank of the value path (``W_v [F, d_v]``, ``W_o [d_v, F]``)."""
    pred_k: int | None = None
    """None: the dense prediction of the paper. An int: keep the pred_k largest predicted codes a token."""

    def validate(self) -> None:
        for name in ("n_heads", "d_head", "d_v"):
            check_int(name, getattr(self, name), lo=1)
        if self.pred_k is not None:
            check_int("pred_k", self.pred_k, lo=1)

    def resolve(self, d_in: int, width: int) -> None:
        if self.pred_k is not None and self.pred_k > width:
            raise ValueError(f"pred_k={self.pred_k} must be <= width={width}")


def past_attention(q_BHTK: Tensor, k_BHTK: Tensor, v_BTV: Tensor, mask_BT: Tensor | None) -> Tensor:
    """Softmax attention of each t over the valid tokens s < t (strictly earlier), heads averaged over one shared
    value per token -> ``[B, T, V]``; 0 where t has no valid earlier token."""
    B, H, T, K = q_BHTK.shape
    s_BHTT = q_BHTK @ k_BHTK.transpose(-1, -2) / math.sqrt(K)
    allowed_TT = torch.ones(T, T, dtype=torch.bool, device=s_BHTT.device).tril(-1)
    allowed_BTT = allowed_TT.expand(B, T, T)
    if mask_BT is not None:
        allowed_BTT = allowed_BTT & mask_BT.bool()[:, None, :]
    s_BHTT = s_BHTT.masked_fill(~allowed_BTT[:, None], float("-inf"))
    any_BT = allowed_BTT.any(-1)
    w_BHTT = torch.softmax(s_BHTT, dim=-1).nan_to_num(0.0)  # rows with no key are all -inf -> nan -> 0
    o_BTV = (w_BHTT.mean(1) @ v_BTV)
    return o_BTV * any_BT[..., None]


@register_part("encoder", "tfa", TFAEncoderConfig)
class TFAEncoder(TokenEncoder):
    """The per-token encoder on what TFA's prediction leaves (``W_qk [F, 2 H K]``, ``W_v [F, d_v]``,
    ``W_o [d_v, F]``, ``b_o [F]``)."""

    cfg: TFAEncoderConfig
    predicts = True
    reads_context = True
    encodes_context = True

    def __init__(self, cfg: TFAEncoderConfig, d_in: int, width: int, W_dec_FD: Tensor, gen: torch.Generator):
        super().__init__(cfg, d_in, width, W_dec_FD, gen)
        c, F = cfg, width
        self.W_qk = nn.Parameter(torch.randn(F, 2 * c.n_heads * c.d_head, generator=gen) / math.sqrt(F))
        self.W_v = nn.Parameter(torch.randn(F, c.d_v, generator=gen) / math.sqrt(F))
        self.W_o = nn.Parameter(torch.randn(c.d_v, F, generator=gen) / math.sqrt(c.d_v))
        self.b_o = nn.Parameter(torch.zeros(F))

    @classmethod
    def flops(cls, cfg, mode, dense, ctx_len=None, n_tokens=None):
        """`TokenEncoder.flops` (the encoder on what the prediction leaves) plus the prediction, every part of it a
        dense product: the codes of x itself (2DF), queries and keys (4FHK), values (2F d_v), the scores and the
        mix over all T positions (2THK + 2T d_v: the [T, T] products are computed whole and masked), ``W_o``
        (2 d_v F), the prediction's decoding (2FD) and its projection (4D, elementwise). Training backpropagates
        through all of it with autograd, counted as twice each product (the weight and the input gradients)."""
        if ctx_len is None:
            raise ValueError("TFA's attention over every earlier token grows with the sequence length: pass ctx_len")
        tok, bwd, step = super().flops(cfg, mode, dense, ctx_len, n_tokens)
        e, D, F, T = cfg.encoder, cfg.d_in, cfg.width, ctx_len
        H, K, V = e.n_heads, e.d_head, e.d_v
        pred = {"tfa_codes": 2 * D * F, "tfa_qk": 4 * F * H * K, "tfa_v": 2 * F * V, "tfa_scores": 2 * T * H * K,
                "tfa_mix": 2 * T * V, "tfa_out": 2 * V * F, "tfa_decode": 2 * F * D}
        tok |= pred | {"tfa_project": 4 * D}
        if mode == "train":
            bwd["tfa_bwd"] = 2 * sum(pred.values())
        return tok, bwd, step

    def raw_prediction(self, st: EncState, mask_BT: Tensor | None) -> Tensor:
        """``p_NF`` before the projection (zero where no valid earlier token)."""
        c, B, T = self.cfg, st.B, st.T
        u_NF = self.dense(st).relu()  # before `prepare` sets xin_ND: the per-token codes of x itself
        qk_NA = u_NF @ self.W_qk
        q_BHTK, k_BHTK = (t.reshape(B, T, c.n_heads, c.d_head).transpose(1, 2)
                          for t in qk_NA.split(c.n_heads * c.d_head, dim=1))
        v_BTV = (u_NF @ self.W_v).reshape(B, T, c.d_v)
        o_BTV = past_attention(q_BHTK, k_BHTK, v_BTV, mask_BT)
        has_N = (o_BTV.abs().sum(-1) > 0).reshape(B * T, 1)
        p_NF = torch.addmm(self.b_o, o_BTV.reshape(B * T, c.d_v), self.W_o).relu() * has_N
        if c.pred_k is not None:
            top_NK = p_NF.detach().topk(c.pred_k, dim=1).indices
            p_NF = torch.zeros_like(p_NF).scatter(1, top_NK, p_NF.gather(1, top_NK))
        return p_NF

    def prepare(self, x_BTD: Tensor, pos_BT: Tensor | None, mask_BT: Tensor | None, b_dec_D: Tensor,
                W_dec_FD: Tensor | None = None, ctx_BT: Tensor | None = None) -> EncState:
        if W_dec_FD is None:
            raise ValueError("the TFA encoder needs the decoder (W_dec_FD) to project its prediction")
        st = super().prepare(x_BTD, pos_BT, mask_BT, b_dec_D, ctx_BT=ctx_BT)
        keys_BT = None if mask_BT is None and ctx_BT is None else st.context_N.reshape(st.B, st.T)
        p_NF = self.raw_prediction(st, keys_BT) * st.mask_N[:, None]
        dp_ND = p_NF @ W_dec_FD
        proj_N1 = (dp_ND * (st.x_ND - b_dec_D)).sum(1, keepdim=True) / (dp_ND.norm(dim=1, keepdim=True) + 1e-6) ** 2
        st.pred_NF = p_NF * proj_N1
        st.pred_ND = dp_ND * proj_N1
        st.xin_ND = st.x_ND - st.pred_ND
        return st

    def scale_latents_(self, scale_F: Tensor) -> None:
        """With W_dec[f] divided by scale_F[f]: u_f and p_f grow by it, and the maps that read u shrink by it, so
        the prediction, the projection and the novel code compute the same function."""
        super().scale_latents_(scale_F)
        self.W_qk.div_(scale_F[:, None])
        self.W_v.div_(scale_F[:, None])
        self.W_o.mul_(scale_F[None, :])
        self.b_o.mul_(scale_F)
