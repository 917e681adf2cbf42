"""Sparse building blocks of the TopK-style training path: active (token, latent) pairs, their pre-activations
re-attached to the graph with a sparse backward, and decoding as an `embedding_bag` over the pairs.

Shapes: N tokens, F latents, D = d_in, M active pairs (``rows_M`` token, ``cols_M`` latent), C context dims,
Bk position buckets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as tnf
from torch import Tensor


class PairPreacts(torch.autograd.Function):
    """``z_NF[rows_M, cols_M]`` re-attached to the graph of
    ``z = x_ND @ W_enc_DF + bias_F + ctx_NC @ U_FC^T + onehot(bucket_N) @ P_FB^T`` (terms optional, None).

    Forward only gathers the precomputed z. Backward takes the pair gradients g as the sparse ``[F, N]`` matrix
    G and returns ``dW_enc = (G x)^T`` and ``dU = G ctx`` (`latent_product`), ``dP``, ``dbias`` by index_add, and ``dx``, ``dctx`` by embedding-bags over the pairs in row
    order (only those that are needed). Never forms a dense ``[N, F]`` gradient and never computes ``dL/dx``
    unless x requires it. Pairs may repeat (they are summed); `segs` gives the sizes of consecutive runs of pairs
    each sorted by row.
    """

    @staticmethod
    def forward(ctx, z_NF, rows_M, cols_M, segs, x_ND, W_enc_DF, bias_F, ctx_NC, U_FC, P_FB, bucket_N):
        ctx.segs = segs
        ctx.shape = tuple(z_NF.shape)
        ctx.n_buckets = 0 if P_FB is None else P_FB.shape[1]
        ctx.save_for_backward(rows_M, cols_M, x_ND, W_enc_DF, ctx_NC, U_FC, bucket_N)
        return z_NF[rows_M, cols_M]

    @staticmethod
    def backward(ctx, grad_M):
        rows_M, cols_M, x_ND, W_enc_DF, ctx_NC, U_FC, bucket_N = ctx.saved_tensors
        n, f = ctx.shape
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 11
        by_latent = latent_product(rows_M, cols_M, grad_M, f) if need[5] or need[8] else None
        if need[4]:
            grads[4] = segment_bags(rows_M, cols_M, grad_M, W_enc_DF.T.contiguous(), n, ctx.segs)
        if need[5]:
            grads[5] = by_latent.sums(x_ND).T
        if need[6]:
            grads[6] = grad_M.new_zeros(f).index_add_(0, cols_M, grad_M)
        if need[7]:
            grads[7] = segment_bags(rows_M, cols_M, grad_M, U_FC, n, ctx.segs)
        if need[8]:
            grads[8] = by_latent.sums(ctx_NC)
        if need[9]:
            nb = ctx.n_buckets
            flat_M = cols_M * nb + bucket_N[rows_M]
            grads[9] = grad_M.new_zeros(f * nb).index_add_(0, flat_M, grad_M).view(f, nb)
        return tuple(grads)


def latent_product(rows_M: Tensor, cols_M: Tensor, w_M: Tensor, n_latents: int) -> "LatentOrder | SparseProduct":
    """``G @ table`` for the COO matrix ``G[cols, rows] = w`` (``.sums(table)``): per-latent embedding-bags
    (`LatentOrder`) in float32, where on CPU they take a third to a half of `torch.sparse.mm`'s time, and
    `torch.sparse.mm` otherwise (in float64 the bags take up to three times as long)."""
    if w_M.dtype == torch.float32:
        return LatentOrder(rows_M, cols_M, w_M, n_latents)
    return SparseProduct(rows_M, cols_M, w_M, n_latents)


class SparseProduct:
    """``G @ table`` by `torch.sparse.mm` (see `latent_product`)."""

    def __init__(self, rows_M: Tensor, cols_M: Tensor, w_M: Tensor, n_latents: int):
        self.rows_M, self.cols_M, self.w_M, self.n_latents = rows_M, cols_M, w_M, n_latents

    def sums(self, table_NA: Tensor) -> Tensor:
        G_FN = torch.sparse_coo_tensor(torch.stack([self.cols_M, self.rows_M]), self.w_M,
                                       (self.n_latents, table_NA.shape[0]), check_invariants=False)
        return torch.sparse.mm(G_FN, table_NA)


class LatentOrder:
    """The pairs ordered by latent (stably: within a latent, in their given order), for ``G @ table``: row f of
    the result is ``sum_{m: cols[m]=f} w[m] table[rows[m]]``, one embedding-bag per latent: the product
    `torch.sparse.mm` computes for the COO matrix ``G[cols, rows] = w`` (to float rounding; in float32 on CPU bit
    for bit), at a third to a half of its cost on CPU (``python benchmarks/bench_train.py`` times both)."""

    def __init__(self, rows_M: Tensor, cols_M: Tensor, w_M: Tensor, n_latents: int):
        order_M = cols_M.argsort(stable=True)
        self.rows_M, self.w_M, self.offsets_F = rows_M[order_M], w_M[order_M], _bag_offsets(cols_M, n_latents)

    def sums(self, table_NA: Tensor) -> Tensor:
        """``[F, A]``: each latent's weighted sum of the rows of ``table_NA`` it is paired with."""
        return tnf.embedding_bag(self.rows_M, table_NA, self.offsets_F, mode="sum", per_sample_weights=self.w_M)


def segment_bags(rows_M: Tensor, cols_M: Tensor, w_M: Tensor, table_FA: Tensor, n_rows: int,
                  segs: tuple[int, ...]) -> Tensor:
    """``out[n] = sum_{m: rows[m]=n} w[m] table[cols[m]]``, for pairs made of row-sorted runs `segs`."""
    out_NA = None
    start = 0
    for size in segs:
        sl = slice(start, start + size)
        part = decode_pairs(rows_M[sl], cols_M[sl], w_M[sl], table_FA, n_rows)
        out_NA = part if out_NA is None else out_NA + part
        start += size
    return out_NA


def _bag_offsets(rows_M: Tensor, n_rows: int) -> Tensor:
    """Start of each row's run in `rows_M` once sorted, as `embedding_bag` offsets."""
    counts_N = torch.bincount(rows_M, minlength=n_rows)
    return counts_N.cumsum(0) - counts_N


def decode_pairs(rows_M: Tensor, cols_M: Tensor, vals_M: Tensor, W_dec_FD: Tensor, n_rows: int) -> Tensor:
    """``sum_{m: rows[m]=n} vals[m] W_dec[cols[m]]`` for each row n -> ``[n_rows, D]`` (rows_M sorted)."""
    offsets_N = _bag_offsets(rows_M, n_rows)
    if torch.is_grad_enabled() and W_dec_FD.requires_grad and W_dec_FD.dtype == torch.float32:
        return PairDecode.apply(rows_M, cols_M, vals_M, W_dec_FD, offsets_N)
    return tnf.embedding_bag(cols_M, W_dec_FD, offsets_N, mode="sum", per_sample_weights=vals_M)


class PairDecode(torch.autograd.Function):
    """`decode_pairs` with the decoder's weight gradient taken per latent (`LatentOrder`: ``dW_dec[f] = sum_{m:
    cols[m]=f} vals[m] g[rows[m]]``) instead of through `embedding_bag`'s dense backward, which on CPU costs 2-4x
    as much in float32 (it dominates the AuxK loss, whose k_aux = d/2 codes per token are ten times TopK's; in
    float64 it does not, and `decode_pairs` keeps `embedding_bag`'s own backward there). The forward and the
    gradient of the values are `embedding_bag`'s own; the weight gradient equals its backward's to float rounding
    (in float32 on the CPU measured, the same bits: 12 training steps end at the same weights)."""

    @staticmethod
    def forward(ctx, rows_M, cols_M, vals_M, W_dec_FD, offsets_N):
        out_ND, offset2bag_M, _, _ = torch.ops.aten._embedding_bag(W_dec_FD, cols_M, offsets_N, False, 0, False,
                                                                   vals_M)
        ctx.save_for_backward(rows_M, cols_M, vals_M, W_dec_FD, offsets_N, offset2bag_M)
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        rows_M, cols_M, vals_M, W_dec_FD, offsets_N, offset2bag_M = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        d_vals = d_W = None
        if ctx.needs_input_grad[2]:
            d_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(grad_ND, W_dec_FD, cols_M, offsets_N,
                                                                               offset2bag_M, 0)
        if ctx.needs_input_grad[3]:
            d_W = LatentOrder(rows_M, cols_M, vals_M, W_dec_FD.shape[0]).sums(grad_ND)
        return None, None, d_vals, d_W, None


def topk_pairs(z_NF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of every row, as (rows_M, cols_M) pairs sorted by row, M = N k."""
    n = z_NF.shape[0]
    cols_NK = z_NF.topk(k, dim=1, sorted=False).indices
    rows_M = torch.arange(n, device=z_NF.device).repeat_interleave(k)
    return rows_M, cols_NK.reshape(-1)


def batch_topk_pairs(z_NF: Tensor, k: int, mask_N: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k * n_valid`` largest entries of the valid rows of z, as (rows_M, cols_M) sorted row-major.

    Exact: candidates are the entries >= a threshold estimated on a strided sample of at most 64 rows (set
    to keep about twice the needed count); if fewer than ``k * n_valid`` entries pass, it falls back to a
    flat top-k over all valid entries. This avoids a top-k over all N*F entries, which is ~10x slower on CPU.
    """
    n, f = z_NF.shape
    dev = z_NF.device
    valid_V = torch.arange(n, device=dev) if mask_N is None else mask_N.nonzero().squeeze(1)
    n_valid = valid_V.numel()
    m = k * n_valid
    if m == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty
    n_sample = min(n_valid, 64)
    if n_sample < n_valid:
        sample_S = valid_V[torch.linspace(0, n_valid - 1, n_sample, device=dev).long()]
        z_sample = z_NF.index_select(0, sample_S).flatten()
        tau = z_sample.topk(min(z_sample.numel(), 2 * k * n_sample), sorted=False).values.min()
        cand_NF = z_NF >= tau
        if mask_N is not None:
            cand_NF &= mask_N[:, None]
        rows_C, cols_C = cand_NF.nonzero(as_tuple=True)
        if rows_C.numel() >= m:
            top = z_NF[rows_C, cols_C].topk(m, sorted=False).indices.sort().values
            return rows_C[top], cols_C[top]
    z_valid = z_NF if mask_N is None else z_NF.index_select(0, valid_V)
    top = z_valid.flatten().topk(m, sorted=False).indices.sort().values
    return valid_V[top // f], top % f
