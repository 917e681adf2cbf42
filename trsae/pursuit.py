"""The amortisation ceiling: how well ANY encoder could do with a given dictionary at a given L0.

An SAE's encoder is an amortised approximation of sparse inference (O'Neill & Klindt 2024): for a fixed
dictionary ``(W_dec, b_dec)`` the best it can do at L0 = k is the best non-negative k-sparse code of each token.
That is NP-hard in general; non-negative orthogonal matching pursuit (Bruckstein, Elad & Zibulevsky 2008) is the
standard greedy approximation and gives an upper bound on that best FVU (a pursuit code is one such code):

    r = x - b_dec;  S = {}
    k times: add argmax_f <r, W_dec[f]> over atoms not in S (stop if no correlation is positive),
             a = argmin_{a >= 0} ||x - b_dec - a W_dec[S]||  (exact NNLS, Lawson-Hanson: scipy.optimize.nnls),
             r = x - b_dec - a W_dec[S]

An atom whose NNLS coefficient falls to zero stays in S (it may come back) and does not count towards L0, so a
code has at most k non-zeros. `ceiling` measures the SAE's own encoder and the pursuit on the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import solve_triangular
from scipy.optimize import nnls
from torch import Tensor

from trsae.metrics import ReconstructionAccumulator
from trsae.saes import SAE
from trsae.store import ActivationStore
from trsae.timing import timed


def nn_omp(x_ND: Tensor, W_dec_FD: Tensor, k: int, chunk: int = 256) -> Tensor:
    """Non-negative OMP codes ``[N, F]`` (float64, at most ``k`` non-zeros per row) of the rows of ``x_ND``
    (bias already subtracted) over the dictionary rows ``W_dec_FD``; see the module docstring.

    Computed in the Gram domain, exactly (float64): with ``c = x W^T`` and ``G = W W^T``, the residual's
    correlations are ``c - a G[S]`` and the NNLS refit on S is ``min_{a>=0} ||L^T a - L^{-1} c[S]||`` with
    ``L L^T = G[S, S]`` (the same objective up to a constant), so no step touches the D-dimensional residual.
    Memory: ``G`` is F x F float64."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    x = x_ND.detach().to("cpu", torch.float64).numpy()
    W = W_dec_FD.detach().to("cpu", torch.float64).numpy()
    N, F = x.shape[0], W.shape[0]
    G_FF = W @ W.T
    codes = np.zeros((N, F))
    rows = np.empty((min(k, F), F))  # G[S] of the token being coded, one row per selected atom
    for lo in range(0, N, chunk):
        c_nF = x[lo:lo + chunk] @ W.T
        for i, c_F in enumerate(c_nF):
            support: list[int] = []
            coef = np.zeros(0)
            corr_F = c_F.copy()
            for s in range(min(k, F)):
                corr_F[support] = -np.inf
                f = int(corr_F.argmax())
                if corr_F[f] <= 0:
                    break
                support.append(f)
                rows[s] = G_FF[f]
                L = np.linalg.cholesky(rows[:s + 1, support])
                coef, _ = nnls(L.T, solve_triangular(L, c_F[support], lower=True, check_finite=False))
                corr_F = c_F - coef @ rows[:s + 1]
            codes[lo + i, support] = coef
    return torch.from_numpy(codes)


@timed("pursuit")
@torch.no_grad()
def ceiling(sae: SAE, store: ActivationStore, split: str = "test", max_seqs: int = 64, batch_size: int = 4,
            k: int | None = None) -> dict:
    """The SAE's encoder and the pursuit on its dictionary at L0 <= ``k`` (default: the SAE's k, its target mean
    L0 for JumpReLU), on the ordinary tokens of the first ``max_seqs`` sequences of ``split`` (the same tokens
    and units as `trsae.evaluate.evaluate_saes`): ``{"fvu_encoder", "fvu_pursuit", "l0_encoder", "l0_pursuit",
    "pursuit_ratio", "n_tokens", "k"}``, ``pursuit_ratio`` = fvu_pursuit / fvu_encoder."""
    k = getattr(sae.cfg.sparsity, "k", None) if k is None else k
    if k is None:
        raise ValueError(f"{sae.cfg.label} has no k: pass the L0 at which to run the pursuit")
    sae.eval()
    enc, pur = ReconstructionAccumulator(), ReconstructionAccumulator()
    scale, W_dec_FD, b_dec_D = store.norm_scale, sae.W_dec.double(), sae.b_dec.double()
    for b in store.first(split, max_seqs, batch_size):
        codes_BTF = sae.encode(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT)
        enc.update(b.acts_BTD / scale, sae.decode(codes_BTF) / scale, codes_BTF, b.mask_BT)
        x_ND = b.acts_BTD[b.mask_BT].double()
        codes_NF = nn_omp(x_ND - b_dec_D, W_dec_FD, k)
        pur.update(x_ND / scale, (codes_NF @ W_dec_FD + b_dec_D) / scale, codes_NF)
    e, p = enc.compute(), pur.compute()
    return {"fvu_encoder": e["fvu"], "fvu_pursuit": p["fvu"], "l0_encoder": e["l0"], "l0_pursuit": p["l0"],
            "pursuit_ratio": p["fvu"] / e["fvu"], "n_tokens": e["n_tokens"], "k": k}
