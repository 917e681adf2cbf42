"""The TRSAE encoder: per-token pre-activations plus sparse position embeddings and a gated read of a short
causal window of earlier tokens.

For token t (window w, C = d_ctx, K = d_k, V = d_v, Bk = n_buckets)::

    z_t = W_enc^T (x_t - b_dec) + b_enc  +  P[:, bucket(t)]  +  g ⊙ (U ctx_t)
    f_t = sparsity(z_t)            (any sparsity part)
    x_hat_t = W_dec^T f_t + b_dec  (per-token linear decoder: context changes which features fire,
                                    never adds a dense path to x_hat)

- ``P [F, Bk]``: position embeddings, zero at init, L1-penalised. Buckets are exact for t < n_exact_pos and
  log-spaced up to pos_max (`trsae.saes.context.position_buckets`).
- ``ctx_t``: linear attention from x_t over x_{t-w} .. x_{t-1} (t itself excluded; masked tokens are no
  keys), feature map elu+1 on queries and keys, values ``x W_v``, in O(T) from prefix sums
  (`trsae.saes.context.windowed_linear_attention`). Zero when the window holds no valid key (t = 0, w = 0).
  Then projected to C dims (``W_o``, only if d_v != d_ctx) and RMS-normalised, so the scale of the context
  term does not depend on w (averages over longer windows shrink) and cannot be inflated through W_v to dodge
  the gate penalty.
- ``U [F, C]``: low-rank read-out, init N(0, ctx_init^2 / C), so at init the context term is small but
  non-zero and every attention weight gets a gradient from step 0.
- gates ``g = sigmoid(gate_logit_F)`` (init logit 0: g = 0.5, so gradient flows both ways), optionally per
  token ``g_tf = sigmoid(gate_logit_f + G_f . q_t)`` with ``G [F, K]`` zero at init.
  Penalty ``gate_l1 * sum_f mean_t(g_tf) ||U_f|| ||W_dec[f]||``: a group lasso on the effective rows
  ``g_f U_f``, invariant to trading scale between g and U, which pushes whole features to ignore context.
  `context_strength()` = ``g_f ||U_f||`` is the std of the context shift of z_f for isotropic unit-RMS
  context; `open_gates(threshold)` counts the features above a threshold of it.
- Both penalties are weighted by the decoder row norms, like the ReLU L1, so `normalize_decoder_` (which
  rescales P and U with the encoder) leaves the loss unchanged.

With ``pred_k`` > 0 the decoder is temporal too, and selectively: the pred_k largest of ``ReLU(V ctx_t + b_pred)``
are codes predicted from the earlier tokens' values, decoded through the same dictionary and counted in L0 (so a
TopK of k - pred_k novel codes keeps L0 <= k); the per-token term then reads ``x_t - W_dec^T pred_t``, and the
reconstruction is ``W_dec^T (pred_t + f_t) + b_dec``. Context still never reaches x_hat except through dictionary
rows.

In the sparse training path the dense pre-activations add the context and position terms in one in-place
product ``z.addmm_([ctx, onehot(bucket)], [g U, P]^T)``, and only the selected (token, latent) pairs carry
gradients to U, g, P and the attention (`trsae.saes.sparse_ops.PairPreacts`). With w = 0 (or use_attn False)
and P = 0 the TRSAE computes exactly (bitwise) what its per-token twin with the same weights computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as tnf
from torch import Tensor, nn

from trsae.saes.config import PartConfig, check_bools, check_float, check_int, register_part
from trsae.saes.context import feature_map, position_buckets, windowed_linear_attention
from trsae.saes.encoders import EncState, TokenEncoder
from trsae.saes.sparse_ops import PairPreacts, decode_pairs, topk_pairs


@dataclass
class TRSAEEncoderConfig(PartConfig):
    """The TRSAE encoder's settings (see the module docstring)."""

    window: int = 16
    """w_max: context tokens x_{t-w} .. x_{t-1}. 0 = no context."""
    w_start: int = 1
    """Window at the start of the curriculum."""
    curriculum_frac: float = 0.0
    """Fraction of training steps over which w grows linearly (in integer steps) from w_start to window;
    0 = no curriculum (always `window`)."""
    d_k: int = 16
    """Query/key dimension of the linear attention (state per token is d_k * (d_v + 1) floats)."""
    d_v: int = 64
    """Value dimension."""
    d_ctx: int = 64
    """Rank of the context read-out U [F, d_ctx]; W_o [d_v, d_ctx] exists only when d_v != d_ctx."""
    ctx_init: float = 0.02
    """Init std of U is ctx_init / sqrt(d_ctx): the context shift of z at init has std ~ g * ctx_init."""
    n_exact_pos: int = 8
    """Positions 0 .. n_exact_pos-1 get their own bucket."""
    n_buckets: int = 32
    """Number of position buckets (log-spaced after the exact ones)."""
    pos_max: int = 1024
    """Positions >= pos_max share the last bucket."""
    pos_l1: float | None = None
    """Weight of ``mean_valid_t sum_f |P[f, bucket(t)]| ||W_dec[f]||``. None -> ``0.001 / d_in`` (the MSE
    gradient on a pre-activation scales as 1/d_in, so does the default); sweep it."""
    gate_l1: float | None = None
    """Weight of ``sum_f mean_t(g_tf) ||U_f|| ||W_dec[f]||``. None -> ``0.001 / d_in``."""
    gate_init: float = 0.0
    """Initial gate logit (0 -> g = 0.5)."""
    temporal_lr_mult: float = 1.0
    """Learning-rate multiplier of the temporal parameters (P, W_qkv, W_o, U, gate logits, G). At 1 they train at
    the SAE's own (tuned) rate; faster rates killed latents at the rates tuning chooses (gemma-3-270m, 300k tokens,
    lr 1.6e-3: 2 % dead at 1, 24 % at 3, 42 % at 10)."""
    per_token_gates: bool = False
    """Gates also depend on the token: ``g_tf = sigmoid(a_f + G_f . q_t)`` (dense [N, F] work; slower)."""
    use_pos: bool = True
    """Ablation switch: position embeddings."""
    use_attn: bool = True
    """Ablation switch: windowed attention context."""
    use_gates: bool = True
    """Ablation switch: False = gates fixed to 1 and no gate penalty."""
    causal: bool = True
    """False = LOOK-AHEAD REFERENCE ABLATION: attends to t-w .. t+w excluding t (codes see the future)."""
    pred_k: int = 0
    """The selective temporal decoder: codes predicted from the attention context (values of earlier tokens
    only), the pred_k largest of ``ReLU(V ctx_t + b_pred)`` a token, decoded through the same dictionary and
    counted in L0; the sparsity then encodes what they leave. 0 = none (the encoder-only TRSAE)."""

    def validate(self) -> None:
        for name in ("window", "w_start", "n_exact_pos"):
            check_int(name, getattr(self, name), lo=0)
        for name in ("d_k", "d_v", "d_ctx", "n_buckets", "pos_max"):
            check_int(name, getattr(self, name), lo=1)
        if self.w_start > self.window:
            raise ValueError(f"w_start={self.w_start} must be <= window={self.window}")
        check_float("curriculum_frac", self.curriculum_frac, lo=0.0)
        if self.curriculum_frac > 1:
            raise ValueError(f"curriculum_frac={self.curriculum_frac} must be in [0, 1]")
        if self.n_exact_pos > self.n_buckets:
            raise ValueError(f"n_exact_pos={self.n_exact_pos} must be <= n_buckets={self.n_buckets}")
        if self.pos_max <= self.n_exact_pos:
            raise ValueError(f"pos_max={self.pos_max} must be > n_exact_pos={self.n_exact_pos}")
        check_float("temporal_lr_mult", self.temporal_lr_mult)
        if self.temporal_lr_mult <= 0:
            raise ValueError(f"temporal_lr_mult={self.temporal_lr_mult} must be > 0")
        for name in ("pos_l1", "gate_l1"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), lo=0.0)
        check_float("ctx_init", self.ctx_init, lo=0.0)
        check_float("gate_init", self.gate_init)
        check_bools(self, "per_token_gates", "use_pos", "use_attn", "use_gates", "causal")
        check_int("pred_k", self.pred_k, lo=0)
        if self.pred_k and not self.use_attn:
            raise ValueError("pred_k > 0 predicts codes from the attention context: it needs use_attn=True")

    def resolve(self, d_in: int, width: int) -> None:
        if self.pos_l1 is None:
            self.pos_l1 = 0.001 / d_in
        if self.gate_l1 is None:
            self.gate_l1 = 0.001 / d_in
        if self.pred_k > width:
            raise ValueError(f"pred_k={self.pred_k} must be <= width={width}")


@register_part("encoder", "trsae", TRSAEEncoderConfig)
class TRSAEEncoder(TokenEncoder):
    """The TRSAE encoder. Inputs must be whole runs of consecutive tokens ``[B, T, d]``; the attention window
    runs along T, positions come from `pos_BT` (default arange)."""

    reads_context = True
    encodes_context = True

    cfg: TRSAEEncoderConfig
    _CONTEXT = ("P", "W_qkv", "W_o", "U", "gate_logit", "G", "V_pred", "b_pred")

    def __init__(self, cfg: TRSAEEncoderConfig, d_in: int, width: int, W_dec_FD: Tensor, gen: torch.Generator):
        super().__init__(cfg, d_in, width, W_dec_FD, gen)
        c, F, D = cfg, width, d_in
        self.register_buffer("window_cur", torch.tensor(c.window, dtype=torch.long))
        if c.use_pos:
            self.P = nn.Parameter(torch.zeros(F, c.n_buckets))
        if c.use_attn:
            self.W_qkv = nn.Parameter(torch.randn(D, 2 * c.d_k + c.d_v, generator=gen) / math.sqrt(D))
            if c.d_v != c.d_ctx:
                self.W_o = nn.Parameter(torch.randn(c.d_v, c.d_ctx, generator=gen) / math.sqrt(c.d_v))
            self.U = nn.Parameter(torch.randn(F, c.d_ctx, generator=gen) * (c.ctx_init / math.sqrt(c.d_ctx)))
            if c.use_gates:
                self.gate_logit = nn.Parameter(torch.full((F,), float(c.gate_init)))
                if c.per_token_gates:
                    self.G = nn.Parameter(torch.zeros(F, c.d_k))
            if c.pred_k:
                self.V_pred = nn.Parameter(torch.randn(F, c.d_ctx, generator=gen) * (c.ctx_init / math.sqrt(c.d_ctx)))
                self.b_pred = nn.Parameter(torch.zeros(F))

    @property
    def predicts(self) -> bool:
        return self.cfg.pred_k > 0

    @classmethod
    def flops(cls, cfg, mode, dense, ctx_len=None, n_tokens=None):
        """`TokenEncoder.flops` plus the context path, none of it growing with the window (the module docstring of
        `trsae.overhead.flops` derives each term): ``x @ W_qkv``, the prefix-sum state and its query, ``W_o``,
        ``ctx @ (g U)^T``, the one-hot position product, the gates, the selective decoder's predictor and its
        decoding; in training their backward (sparse over the k pairs unless ``dense``), and the norm-weighted
        position / gate penalties once a step (~5FD, counted once with a dense sparsity's own)."""
        tok, bwd, step = super().flops(cfg, mode, dense, ctx_len, n_tokens)
        e, D, F = cfg.encoder, cfg.d_in, cfg.width
        k = getattr(cfg.sparsity, "k", F)
        K, V, C = e.d_k, e.d_v, e.d_ctx
        attn, pos = e.use_attn and e.window > 0, e.use_pos
        tok_gates = attn and e.use_gates and e.per_token_gates
        train = mode == "train"
        if attn:
            tok |= {"context_qkv": 2 * D * (2 * K + V), "context_state": 3 * K * (V + 1),
                    "context_query": 2 * K * (V + 1)}
            if V != C:
                tok["context_out"] = 2 * V * C
            tok["context_U"] = 2 * C * F
            if tok_gates:
                tok["gates"] = 2 * K * F
            elif e.use_gates:
                step["gate_fold"] = (4 if train else 1) * F * C
        if pos:
            tok["position"] = 2 * e.n_buckets * F
        if attn and e.pred_k:
            tok |= {"predictor": 2 * C * F, "predicted_decode": 2 * e.pred_k * D}
        if not train:
            return tok, bwd, step
        if dense and (attn or pos):
            bwd["context_U_bwd"] = 4 * ((C if attn else 0) + (e.n_buckets if pos else 0)) * F
            if not attn:
                bwd["context_U_bwd"] //= 2  # one-hot input: only dP
            if tok_gates:
                bwd["gates_bwd"] = 4 * K * F
        elif attn:
            bwd["context_U_bwd"] = 4 * k * C
            if tok_gates:
                bwd["gates_bwd"] = 4 * k * (K + C)
        if attn:
            bwd["context_qkv_bwd"] = 2 * D * (2 * K + V)
            bwd["context_state_bwd"] = 9 * K * (V + 1)
            if V != C:
                bwd["context_out_bwd"] = 4 * V * C
            if e.pred_k:  # the predicted pairs' sparse backward (dV_pred, d ctx) and their decoding's
                bwd |= {"predictor_bwd": 4 * e.pred_k * C, "predicted_decode_bwd": 4 * e.pred_k * D}
        if not dense and (pos or (e.use_attn and e.use_gates)):
            step["decoder_norm"] = 5 * F * D
        return tok, bwd, step

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        return [([p for n, p in self.named_parameters() if n in self._CONTEXT], self.cfg.temporal_lr_mult)]

    # ----------------------------------------------------------------- window / curriculum
    @property
    def window(self) -> int:
        """Current attention window."""
        return int(self.window_cur)

    def set_window(self, w: int) -> None:
        check_int("window", w, lo=0)
        self.window_cur.fill_(w)

    def window_at(self, step: int, total_steps: int) -> int:
        """Curriculum: w_start at step 0, growing linearly (floored to an int) to `window` at
        ``curriculum_frac * total_steps``, then constant."""
        c = self.cfg
        if c.curriculum_frac <= 0 or total_steps <= 0:
            return c.window
        frac = min(max(step / (c.curriculum_frac * total_steps), 0.0), 1.0)
        return c.w_start + int(math.floor(frac * (c.window - c.w_start) + 1e-9))

    def on_step(self, step: int, total_steps: int) -> None:
        self.set_window(self.window_at(step, total_steps))

    def log_stats(self) -> dict[str, float]:
        return {"window": self.window}

    @property
    def _attn_on(self) -> bool:
        return self.cfg.use_attn and self.window > 0

    # ----------------------------------------------------------------- what the encoder uses
    def context(self, x_BTD: Tensor, mask_BT: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(ctx_BTC RMS-normalised attention context, q_BTK raw queries)."""
        c = self.cfg
        qkv = x_BTD @ self.W_qkv
        q_BTK, k_BTK, v_BTV = qkv.split([c.d_k, c.d_k, c.d_v], dim=-1)
        ctx_BTV = windowed_linear_attention(feature_map(q_BTK), feature_map(k_BTK), v_BTV, self.window,
                                            mask_BT, causal=c.causal)
        ctx_BTC = ctx_BTV @ self.W_o if c.d_v != c.d_ctx else ctx_BTV
        ctx_BTC = ctx_BTC * torch.rsqrt(ctx_BTC.pow(2).mean(-1, keepdim=True) + 1e-6)
        dtype = self.W_qkv.dtype  # back from an autocast dtype, as `TokenEncoder.dense`
        return ctx_BTC.to(dtype), q_BTK.to(dtype)

    def gates(self) -> Tensor:
        """Per-feature gates ``sigmoid(gate_logit)`` [F] (ones when gates are off; with per-token gates
        this is the token-independent part)."""
        if self.cfg.use_attn and self.cfg.use_gates:
            return torch.sigmoid(self.gate_logit)
        return torch.ones(self.b_enc.shape[0], device=self.W_enc.device)

    def context_strength(self) -> Tensor:
        """``g_f ||U_f||`` [F]: std of feature f's context shift for isotropic unit-RMS context (0 if no attn).
        g alone is not identifiable (g and U trade scale), so this is what says whether f uses context."""
        if not self.cfg.use_attn:
            return torch.zeros(self.b_enc.shape[0], device=self.W_enc.device)
        return self.gates() * self.U.norm(dim=1)

    def token_strength(self) -> Tensor:
        """``||W_enc[:, f]||`` [F]: std of feature f's token term for isotropic unit-RMS input (the store's
        normalisation gives inputs unit RMS per dimension), the scale the context and position terms are
        compared with."""
        return self.W_enc.norm(dim=0)

    def open_gates(self, threshold: float = 0.1) -> int:
        """Number of features whose `context_strength` exceeds ``threshold`` times their `token_strength`
        (0.1: the context moves the pre-activation by a tenth of what the current token does)."""
        return int((self.context_strength() > threshold * self.token_strength()).sum())

    def buckets(self, pos_BT: Tensor) -> Tensor:
        c = self.cfg
        return position_buckets(pos_BT, c.n_exact_pos, c.n_buckets, c.pos_max)

    def positional_features(self, threshold: float = 0.1) -> list[tuple[int, list[int]]]:
        """Features with some ``|P[f, b]|`` above ``threshold`` times their `token_strength`, and those buckets,
        strongest first (see `bucket_bounds` for the positions of each bucket)."""
        if not self.cfg.use_pos:
            return []
        P_rel = self.P.detach().abs() / self.token_strength().detach()[:, None]
        strong_F = P_rel.max(dim=1).values
        feats = (strong_F > threshold).nonzero().squeeze(1)
        feats = feats[strong_F[feats].argsort(descending=True)]
        return [(int(f), (P_rel[f] > threshold).nonzero().squeeze(1).tolist()) for f in feats]

    # ----------------------------------------------------------------- encoder interface
    def prepare(self, x_BTD: Tensor, pos_BT: Tensor | None, mask_BT: Tensor | None, b_dec_D: Tensor,
                W_dec_FD: Tensor | None = None, ctx_BT: Tensor | None = None) -> EncState:
        st = super().prepare(x_BTD, pos_BT, mask_BT, b_dec_D, ctx_BT=ctx_BT)
        c = self.cfg
        B, T = st.B, st.T
        if c.use_pos:
            if pos_BT is None:
                pos_BT = torch.arange(T, device=x_BTD.device).expand(B, T)
            st.extra["bucket_N"] = self.buckets(pos_BT).reshape(B * T)
        if self._attn_on:
            mask = None if mask_BT is None and ctx_BT is None else st.context_N.reshape(B, T)
            ctx_BTC, q_BTK = self.context(x_BTD, mask)
            st.extra["ctx_NC"] = ctx_BTC.reshape(B * T, c.d_ctx)
            if c.use_gates and c.per_token_gates:
                st.extra["q_NK"] = q_BTK.reshape(B * T, c.d_k)
            else:
                st.extra["U_eff_FC"] = self.gates()[:, None] * self.U
        if c.pred_k:
            self._predict(st, W_dec_FD)
        return st

    def _predict(self, st: EncState, W_dec_FD: Tensor | None) -> None:
        """The selective temporal decoder (`pred_k`): predicted pairs from the context, their decoding, and the
        residual the per-token term reads."""
        if W_dec_FD is None:
            raise ValueError("a TRSAE with pred_k > 0 needs the decoder (W_dec_FD) to decode its prediction")
        N, F = st.x_ND.shape[0], self.b_enc.shape[0]
        if not self._attn_on:
            st.pred_NF, st.pred_ND = st.x_ND.new_zeros(N, F), st.x_ND.new_zeros(st.x_ND.shape)
            return
        ctx_NC = st.extra["ctx_NC"]
        with torch.no_grad():
            p_NF = torch.addmm(self.b_pred, ctx_NC, self.V_pred.T).to(self.V_pred.dtype)
            rows_M, cols_M = topk_pairs(p_NF, self.cfg.pred_k)
        # the pairs' values re-attached through the sparse backward of the encoder's own pairs: a plain autograd
        # gather (V_pred[cols_M]) backpropagates by index_put_ with accumulation, whose parallel CPU kernel adds in
        # thread order, so the same seed trained to different weights run to run
        vals_M = PairPreacts.apply(p_NF, rows_M, cols_M, (rows_M.numel(),), None, None, self.b_pred, ctx_NC,
                                   self.V_pred, None, None).relu()
        has_N = st.mask_N & (ctx_NC.detach().abs().sum(1) > 0)  # no prediction without an earlier valid token
        vals_M = vals_M * has_N[rows_M]
        st.pred_NF = st.x_ND.new_zeros(N, F).index_put((rows_M, cols_M), vals_M)
        st.pred_ND = decode_pairs(rows_M, cols_M, vals_M, W_dec_FD, N)
        st.xin_ND = st.x_ND - st.pred_ND

    def _token_gates(self, q_NK: Tensor) -> Tensor:
        """``g_NF = sigmoid(gate_logit + q G^T)``."""
        return torch.addmm(self.gate_logit, q_NK, self.G.T).to(self.G.dtype).sigmoid_()

    def dense(self, st: EncState) -> Tensor:
        z_NF = super().dense(st)
        ex = st.extra
        ins, outs = [], []  # low-rank terms added in one in-place pass over z: [ctx, onehot] @ [gU, P]^T
        if "U_eff_FC" in ex:
            ins.append(ex["ctx_NC"])
            outs.append(ex["U_eff_FC"])
        elif "q_NK" in ex:  # per-token gates: dense [N, F] work, in place where autograd allows
            z_NF = z_NF.addcmul_(self._token_gates(ex["q_NK"]), ex["ctx_NC"] @ self.U.T)
        if "bucket_N" in ex:
            ins.append(tnf.one_hot(ex["bucket_N"], self.cfg.n_buckets).to(z_NF.dtype))
            outs.append(self.P)
        if ins:
            in_NA = ins[0] if len(ins) == 1 else torch.cat(ins, dim=1)
            w_FA = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
            z_NF = z_NF.addmm_(in_NA, w_FA.T)
        return z_NF

    def pair_terms(self, st: EncState):
        ex = st.extra
        P_FB = self.P if "bucket_N" in ex else None
        return ex.get("ctx_NC") if "U_eff_FC" in ex else None, ex.get("U_eff_FC"), P_FB, ex.get("bucket_N")

    def at_pairs(self, st: EncState, z_NF: Tensor, rows_M: Tensor, cols_M: Tensor,
                 segs: tuple[int, ...]) -> Tensor:
        vals_M = super().at_pairs(st, z_NF, rows_M, cols_M, segs)
        if "q_NK" not in st.extra:
            return vals_M
        # per-token gates: plain autograd on the pairs, added with value 0 (z already holds it). The gathers are
        # index_select, whose backward (index_add_) adds in index order on the CPU; indexing (x[idx]) backpropagates
        # through index_put_'s parallel accumulation, in thread order, so the same seed trained to different weights
        pick = torch.index_select
        q_MK = pick(st.extra["q_NK"], 0, rows_M)
        g_M = torch.sigmoid(pick(self.gate_logit, 0, cols_M) + (q_MK * pick(self.G, 0, cols_M)).sum(1))
        ctx_M = g_M * (pick(st.extra["ctx_NC"], 0, rows_M) * pick(self.U, 0, cols_M)).sum(1)
        return vals_M + (ctx_M - ctx_M.detach())

    def losses(self, st: EncState, W_dec_FD: Tensor, codes=None) -> dict[str, Tensor]:
        """pos_l1 and gate terms. Both are weighted by the decoder row norms ``||W_dec[f]||`` (as the ReLU L1 is),
        so they measure a latent's shift in output units and the total loss is invariant under
        `normalize_decoder_` (which rescales P and U with the encoder)."""
        c = self.cfg
        ex = st.extra
        maskf_N = st.mask_N.to(st.x_ND.dtype)
        n_valid = maskf_N.sum().clamp_min(1.0)
        out: dict[str, Tensor] = {}
        dec_norm_F = W_dec_FD.norm(dim=1)
        if c.use_pos:
            freq_B = torch.zeros(c.n_buckets, dtype=maskf_N.dtype, device=maskf_N.device)
            freq_B = freq_B.index_add(0, ex["bucket_N"], maskf_N) / n_valid
            out["pos_l1"] = c.pos_l1 * (dec_norm_F @ self.P.abs() @ freq_B)
        if c.use_attn and c.use_gates:
            if not self._attn_on:
                out["gate"] = st.x_ND.new_zeros(())
            else:
                if "q_NK" in ex:
                    gbar_F = (self._token_gates(ex["q_NK"]) * maskf_N[:, None]).sum(0) / n_valid
                else:
                    gbar_F = self.gates()
                out["gate"] = c.gate_l1 * (gbar_F * self.U.norm(dim=1) * dec_norm_F).sum()
        return out

    def scale_latents_(self, scale_F: Tensor) -> None:
        super().scale_latents_(scale_F)
        if self.cfg.use_pos:
            self.P.mul_(scale_F[:, None])
        if self.cfg.use_attn:
            self.U.mul_(scale_F[:, None])
        if self.cfg.pred_k:
            self.V_pred.mul_(scale_F[:, None])
            self.b_pred.mul_(scale_F)
