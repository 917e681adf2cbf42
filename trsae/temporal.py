"""TRSAE: a sparse autoencoder whose encoder sees position and a short causal window of earlier tokens.

For token t (window w, C = d_ctx, K = d_k, V = d_v, Bk = n_buckets)::

    z_t = W_enc^T (x_t - b_dec) + b_enc  +  P[:, bucket(t)]  +  g ⊙ (U ctx_t)
    f_t = sparsity(z_t)            (topk | batchtopk | relu, `TRSAEConfig.sparsity`)
    x_hat_t = W_dec^T f_t + b_dec  (per-token linear decoder: context changes which features fire,
                                    never adds a dense path to x_hat)

- ``P [F, Bk]``: position embeddings, zero at init, L1-penalised. Buckets are exact for t < n_exact_pos and
  log-spaced up to pos_max (`position_buckets`).
- ``ctx_t``: linear attention from x_t over x_{t-w} .. x_{t-1} (t itself excluded; masked tokens are no
  keys), feature map elu+1 on queries and keys, values ``x W_v``, normalised by ``sum_s q_t . k_s``; computed
  in O(T) from prefix sums over ``k_s ⊗ [v_s, 1]`` (state K*(V+1) floats per token, independent of w). Zero
  when the window holds no valid key (t = 0, w = 0). Then projected to C dims (``W_o``, only if
  d_v != d_ctx) and RMS-normalised, so the scale of the context term does not depend on w (averages over
  longer windows shrink) and cannot be inflated through W_v to dodge the gate penalty.
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

The TopK-style sparse training path of `trsae.saes` is extended: the dense pre-activations add the context
and position terms in one in-place product ``z.addmm_([ctx, onehot(bucket)], [g U, P]^T)``, and only the
selected (token, latent) pairs carry gradients to U, g, P and the attention (sparse products in
`trsae.saes._PairPreacts`). With w = 0 (or use_attn False) and P = 0 the TRSAE computes exactly (bitwise)
what a TopK / BatchTopK / ReLU SAE with the same W_enc, b_enc, W_dec, b_dec computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as tnf
from torch import Tensor, nn

from trsae.saes import ARCHS, SAE, SAEConfig, _check_float, _check_int, _EncState, register_sae


# --------------------------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class TRSAEConfig(SAEConfig):
    """A TRSAE: the fields of SAEConfig (arch = "trsae") plus the temporal components. Keyword-only."""

    arch: str = "trsae"
    """Always "trsae"; the sparsity mechanism is `sparsity`."""
    sparsity: str = "topk"
    """Mechanism of the baseline it is matched to: "topk" | "batchtopk" | "relu"."""
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
    """Weight of ``mean_valid_t sum_f |P[f, bucket(t)]| ||W_dec[f]||`` (L1 of the positional shift a token sees).
    None -> ``0.001 / d_in``: the MSE gradient on a pre-activation scales as 1/d_in, so does the default. On a
    synthetic d=64 task, 10x less left most features positional, 10x more left almost none. On gemma-3-270m
    layer 6 (150k training tokens, training-batch FVU), 0.01 / d_in kept 99% of features context-free and gave
    FVU 0.230; 0.001 / d_in (both penalties) gave 0.227 (TRSAE with lr multiplier 1: 0.235): sweep it."""
    gate_l1: float | None = None
    """Weight of ``sum_f mean_t(g_tf) ||U_f|| ||W_dec[f]||`` (group lasso on the effective context rows).
    None -> ``0.001 / d_in`` (same reasoning and same caveat as pos_l1)."""
    gate_init: float = 0.0
    """Initial gate logit (0 -> g = 0.5)."""
    temporal_lr_mult: float = 10.0
    """Learning-rate multiplier of the temporal parameters (P, W_qkv, W_o, U, gate logits, G). They start at
    zero or ctx_init scale and Adam moves each entry by about lr per step, so at lr 4e-4 a few hundred steps
    left them where they started (gates 0.5 +- 0.003, context shift std <= 0.06 against a token term of ~0.9)."""
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

    def _allowed_archs(self) -> tuple[str, ...]:
        return ("trsae",)

    @property
    def mechanism(self) -> str:
        return self.sparsity

    def validate(self) -> None:
        if self.sparsity not in ARCHS:
            raise ValueError(f"unknown sparsity {self.sparsity!r}: expected one of {ARCHS}")
        super().validate()
        for name in ("window", "w_start", "n_exact_pos"):
            _check_int(name, getattr(self, name), lo=0)
        for name in ("d_k", "d_v", "d_ctx", "n_buckets", "pos_max"):
            _check_int(name, getattr(self, name), lo=1)
        if self.w_start > self.window:
            raise ValueError(f"w_start={self.w_start} must be <= window={self.window}")
        _check_float("curriculum_frac", self.curriculum_frac, lo=0.0)
        if self.curriculum_frac > 1:
            raise ValueError(f"curriculum_frac={self.curriculum_frac} must be in [0, 1]")
        if self.n_exact_pos > self.n_buckets:
            raise ValueError(f"n_exact_pos={self.n_exact_pos} must be <= n_buckets={self.n_buckets}")
        if self.pos_max <= self.n_exact_pos:
            raise ValueError(f"pos_max={self.pos_max} must be > n_exact_pos={self.n_exact_pos}")
        if self.pos_l1 is None:
            self.pos_l1 = 0.001 / self.d_in
        if self.gate_l1 is None:
            self.gate_l1 = 0.001 / self.d_in
        _check_float("temporal_lr_mult", self.temporal_lr_mult)
        if self.temporal_lr_mult <= 0:
            raise ValueError(f"temporal_lr_mult={self.temporal_lr_mult} must be > 0")
        for name in ("pos_l1", "gate_l1", "ctx_init"):
            _check_float(name, getattr(self, name), lo=0.0)
        _check_float("gate_init", self.gate_init)
        for name in ("per_token_gates", "use_pos", "use_attn", "use_gates", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------------------------- positions


def position_buckets(pos: Tensor, n_exact: int, n_buckets: int, pos_max: int) -> Tensor:
    """Bucket of each absolute position: ``t`` for t < n_exact, else
    ``n_exact + floor((n_buckets - n_exact) * log(t / n_exact) / log(pos_max / n_exact))``, capped at
    n_buckets - 1 (so every t >= pos_max is in the last bucket)."""
    pos = pos.long().clamp_min(0)
    n_log = n_buckets - n_exact
    if n_log <= 0:
        return pos.clamp_max(n_buckets - 1)
    safe = pos.clamp_min(max(n_exact, 1)).double()
    log_b = n_exact + torch.floor(n_log * torch.log(safe / n_exact) / math.log(pos_max / n_exact)).long()
    return torch.where(pos < n_exact, pos, log_b.clamp_max(n_buckets - 1))


def bucket_bounds(n_exact: int, n_buckets: int, pos_max: int) -> list[tuple[int, int]]:
    """[first, last] position of each bucket (last = -1 for the open-ended final bucket; a bucket that no
    integer position reaches gets (-1, -1))."""
    pos = torch.arange(pos_max + 1)
    b = position_buckets(pos, n_exact, n_buckets, pos_max)
    out = []
    for i in range(n_buckets):
        hit = (b == i).nonzero().squeeze(1)
        if hit.numel() == 0:
            out.append((-1, -1))
        else:
            out.append((int(hit[0]), -1 if i == n_buckets - 1 else int(hit[-1])))
    return out


# --------------------------------------------------------------------------------------------- attention


def windowed_linear_attention(q_BTK: Tensor, k_BTK: Tensor, v_BTV: Tensor, window: int,
                              mask_BT: Tensor | None = None, causal: bool = True) -> Tensor:
    """``c_t = sum_s (q_t . k_s) v_s / sum_s (q_t . k_s)`` over valid s in t-w .. t-1 (causal) or
    t-w .. t+w minus t (look-ahead), in O(T) time and O(T K V) memory from prefix sums; 0 where no valid key.

    q and k must be non-negative (already feature-mapped). Masked tokens are no keys. The window sum is a
    difference of prefix sums: relative float error ~ eps * t / w, fine for T in the thousands.
    """
    B, T, V = v_BTV.shape
    if window <= 0 or T == 0:
        return v_BTV.new_zeros(B, T, V)
    if mask_BT is not None:
        k_BTK = k_BTK * mask_BT[..., None].to(k_BTK.dtype)
    v1_BTW = torch.cat([v_BTV, v_BTV.new_ones(B, T, 1)], dim=-1)           # W = V + 1: values and a 1
    kv_BTKW = k_BTK[..., :, None] * v1_BTW[..., None, :]
    cs_BTKW = tnf.pad(kv_BTKW.cumsum(1), (0, 0, 0, 0, 1, 0))                # cs[t] = sum_{s < t}, [B, T+1, K, W]
    w = min(window, T)
    if causal:  # sum over s in [max(t - w, 0), t): cs[t] - cs[max(t - w, 0)], cs[0] = 0
        win_BTKW = torch.cat([cs_BTKW[:, :w], cs_BTKW[:, w:T] - cs_BTKW[:, :T - w]], dim=1)
    else:       # plus s in [t + 1, min(t + w + 1, T))
        t = torch.arange(T, device=v_BTV.device)
        left = cs_BTKW[:, t] - cs_BTKW[:, (t - w).clamp_min(0)]
        right = cs_BTKW[:, (t + w + 1).clamp_max(T)] - cs_BTKW[:, t + 1]
        win_BTKW = left + right
    out_BTW = torch.einsum("btk,btkw->btw", q_BTK, win_BTKW)
    num_BTV, den_BT1 = out_BTW[..., :V], out_BTW[..., V:]
    empty_BT1 = den_BT1 <= 0  # no valid key: num is 0 too; divide by 1 so that gradients stay finite
    return num_BTV / torch.where(empty_BT1, torch.ones_like(den_BT1), den_BT1)


def naive_window_attention(q_BTK: Tensor, k_BTK: Tensor, v_BTV: Tensor, window: int,
                           mask_BT: Tensor | None = None, causal: bool = True) -> Tensor:
    """Reference for `windowed_linear_attention`: an explicit loop over t with a masked window."""
    B, T, V = v_BTV.shape
    out = v_BTV.new_zeros(B, T, V)
    valid_BT = torch.ones(B, T, dtype=torch.bool, device=v_BTV.device) if mask_BT is None else mask_BT.bool()
    for t in range(T):
        if causal:
            idx = list(range(max(t - window, 0), t))
        else:
            idx = [s for s in range(max(t - window, 0), min(t + window + 1, T)) if s != t]
        if window <= 0 or not idx:
            continue
        s_idx = torch.tensor(idx, device=v_BTV.device)
        for b in range(B):
            keep = s_idx[valid_BT[b, s_idx]]
            if keep.numel() == 0:
                continue
            scores_S = k_BTK[b, keep] @ q_BTK[b, t]
            out[b, t] = (scores_S[:, None] * v_BTV[b, keep]).sum(0) / scores_S.sum()
    return out


def feature_map(x: Tensor) -> Tensor:
    """Positive feature map of linear attention: elu(x) + 1."""
    return tnf.elu(x) + 1


# --------------------------------------------------------------------------------------------- the model


@register_sae("trsae")
class TRSAE(SAE):
    """Temporal-relational SAE (see the module docstring). Inputs must be whole windows of consecutive
    tokens ``[B, T, d]``; the attention window runs along T, positions come from `pos_BT` (default arange)."""

    config_class = TRSAEConfig
    cfg: TRSAEConfig

    def _init_extra(self, gen: torch.Generator) -> None:
        c = self.cfg
        F, D = c.width, c.d_in
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

    def optim_groups(self, lr: float) -> list[dict]:
        temporal = {"P", "W_qkv", "W_o", "U", "gate_logit", "G"}
        named = list(self.named_parameters())
        return [{"params": [p for n, p in named if n not in temporal], "lr": lr},
                {"params": [p for n, p in named if n in temporal], "lr": lr * self.cfg.temporal_lr_mult}]

    # ----------------------------------------------------------------- window / curriculum
    @property
    def window(self) -> int:
        """Current attention window."""
        return int(self.window_cur)

    def set_window(self, w: int) -> None:
        _check_int("window", w, lo=0)
        self.window_cur.fill_(w)

    def window_at(self, step: int, total_steps: int) -> int:
        """Curriculum: w_start at step 0, growing linearly (floored to an int) to `window` at
        ``curriculum_frac * total_steps``, then constant."""
        c = self.cfg
        if c.curriculum_frac <= 0 or total_steps <= 0:
            return c.window
        frac = min(max(step / (c.curriculum_frac * total_steps), 0.0), 1.0)
        return c.w_start + int(math.floor(frac * (c.window - c.w_start) + 1e-9))

    @property
    def _attn_on(self) -> bool:
        return self.cfg.use_attn and self.window > 0

    # ----------------------------------------------------------------- encoder
    def context(self, x_BTD: Tensor, mask_BT: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(ctx_BTC RMS-normalised attention context, q_BTK raw queries)."""
        c = self.cfg
        qkv = x_BTD @ self.W_qkv
        q_BTK, k_BTK, v_BTV = qkv.split([c.d_k, c.d_k, c.d_v], dim=-1)
        ctx_BTV = windowed_linear_attention(feature_map(q_BTK), feature_map(k_BTK), v_BTV, self.window,
                                            mask_BT, causal=c.causal)
        ctx_BTC = ctx_BTV @ self.W_o if c.d_v != c.d_ctx else ctx_BTV
        ctx_BTC = ctx_BTC * torch.rsqrt(ctx_BTC.pow(2).mean(-1, keepdim=True) + 1e-6)
        return ctx_BTC, q_BTK

    def gates(self) -> Tensor:
        """Per-feature gates ``sigmoid(gate_logit)`` [F] (ones when gates are off; with per-token gates
        this is the token-independent part)."""
        if self.cfg.use_attn and self.cfg.use_gates:
            return torch.sigmoid(self.gate_logit)
        return torch.ones(self.cfg.width, device=self.W_dec.device)

    def context_strength(self) -> Tensor:
        """``g_f ||U_f||`` [F]: std of feature f's context shift for isotropic unit-RMS context (0 if no attn).
        g alone is not identifiable (g and U trade scale), so this is what says whether f uses context."""
        if not self.cfg.use_attn:
            return torch.zeros(self.cfg.width, device=self.W_dec.device)
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

    def _enc_state(self, x_BTD: Tensor, pos_BT: Tensor | None, mask_BT: Tensor | None) -> _EncState:
        st = super()._enc_state(x_BTD, pos_BT, mask_BT)
        c = self.cfg
        B, T = st.B, st.T
        if c.use_pos:
            if pos_BT is None:
                pos_BT = torch.arange(T, device=x_BTD.device).expand(B, T)
            st.extra["bucket_N"] = self.buckets(pos_BT).reshape(B * T)
        if self._attn_on:
            mask = None if mask_BT is None else mask_BT.bool()
            ctx_BTC, q_BTK = self.context(x_BTD, mask)
            st.extra["ctx_NC"] = ctx_BTC.reshape(B * T, c.d_ctx)
            if c.use_gates and c.per_token_gates:
                st.extra["q_NK"] = q_BTK.reshape(B * T, c.d_k)
            else:
                st.extra["U_eff_FC"] = self.gates()[:, None] * self.U
        return st

    def _token_gates(self, q_NK: Tensor) -> Tensor:
        """``g_NF = sigmoid(gate_logit + q G^T)``."""
        return torch.addmm(self.gate_logit, q_NK, self.G.T).sigmoid_()

    def _dense_preacts(self, st: _EncState) -> Tensor:
        z_NF = super()._dense_preacts(st)
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

    def _pair_terms(self, st: _EncState):
        ex = st.extra
        P_FB = self.P if "bucket_N" in ex else None
        return ex.get("ctx_NC") if "U_eff_FC" in ex else None, ex.get("U_eff_FC"), P_FB, ex.get("bucket_N")

    def _preacts_at(self, st: _EncState, z_NF: Tensor, rows_M: Tensor, cols_M: Tensor,
                    segs: tuple[int, ...]) -> Tensor:
        vals_M = super()._preacts_at(st, z_NF, rows_M, cols_M, segs)
        if "q_NK" not in st.extra:
            return vals_M
        # per-token gates: plain autograd on the pairs, added with value 0 (z already holds it)
        q_MK = st.extra["q_NK"][rows_M]
        g_M = torch.sigmoid(self.gate_logit[cols_M] + (q_MK * self.G[cols_M]).sum(1))
        ctx_M = g_M * (st.extra["ctx_NC"][rows_M] * self.U[cols_M]).sum(1)
        return vals_M + (ctx_M - ctx_M.detach())

    def _extra_losses(self, st: _EncState) -> dict[str, Tensor]:
        """pos_l1 and gate terms. Both are weighted by the decoder row norms ``||W_dec[f]||`` (as the ReLU L1 is),
        so they measure a latent's shift in output units and the total loss is invariant under
        `normalize_decoder_` (which rescales P and U with the encoder)."""
        c = self.cfg
        ex = st.extra
        maskf_N = st.mask_N.to(st.x_ND.dtype)
        n_valid = maskf_N.sum().clamp_min(1.0)
        out: dict[str, Tensor] = {}
        dec_norm_F = self.W_dec.norm(dim=1)
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

    def _scale_latents_(self, scale_F: Tensor) -> None:
        super()._scale_latents_(scale_F)
        if self.cfg.use_pos:
            self.P.mul_(scale_F[:, None])
        if self.cfg.use_attn:
            self.U.mul_(scale_F[:, None])
