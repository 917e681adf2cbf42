"""The two context computations of the TRSAE encoder, pure functions: position buckets and windowed linear
attention in O(T), with the naive O(T w) loop it is tested against.

Shapes: B batch, T time, K = d_k, V = d_v.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as tnf
from torch import Tensor


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
