"""Reconstruction, shrinkage, sparsity and feature-density metrics, streamed over batches (definitions in
`trsae.metrics`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trsae.metrics.common import flat_mask, flatten, ratio

_EV_EPS = 1e-10  # SAELens' guard on a vanishing total variance
_NORM_IN_EPS = 1e-4  # SAEBench: ‖x‖ below this is replaced by 1 in l2_ratio
_COS_EPS = 1e-12


def _guarded_ev(resid: torch.Tensor | float, total: torch.Tensor | float):
    """1 − resid/total, with SAELens' guard where total < 1e-10 (1 if resid < 1e-10, else 0)."""
    if isinstance(resid, torch.Tensor):
        small = total < _EV_EPS
        safe = torch.where(small, torch.ones_like(total), total)
        ev = 1.0 - resid / safe
        return torch.where(small, (resid < _EV_EPS).to(ev.dtype), ev)
    if total < _EV_EPS:
        return 1.0 if resid < _EV_EPS else 0.0
    return 1.0 - resid / total


class ReconstructionAccumulator:
    """Streams reconstruction, shrinkage and sparsity sums over batches; ``compute()`` gives the metrics.

    ``update(x_BTD, x_hat_BTD, codes_BTF, mask_BT)``: x and x̂ in the model's own scale (normalisation
    undone), codes as the SAE emits them; only tokens where ``mask_BT`` is True count. Any number of leading
    dims works (``[N, D]`` with a ``[N]`` mask too). ``codes_BTF`` may be ``None`` (then l0 / l1 are None).
    """

    def __init__(self) -> None:
        self.n_tokens = 0
        self.n_batches = 0
        self.d: int | None = None
        self.mean_D: torch.Tensor | None = None  # running mean of x, float64
        self.m2_D: torch.Tensor | None = None  # running Σ (x − mean)², float64
        self.sum_resid = 0.0  # Σ‖x − x̂‖²
        self.sum_ev_legacy = 0.0
        self.sum_cos = 0.0
        self.sum_norm_in = 0.0
        self.sum_norm_out = 0.0
        self.sum_l2_ratio = 0.0
        self.sum_xhat_sq = 0.0  # Σ‖x̂‖²
        self.sum_x_dot_xhat = 0.0  # Σ x·x̂
        self.n_code_tokens = 0
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0

    @torch.no_grad()
    def update(
        self,
        x_BTD: torch.Tensor,
        x_hat_BTD: torch.Tensor,
        codes_BTF: torch.Tensor | None = None,
        mask_BT: torch.Tensor | None = None,
    ) -> None:
        if x_BTD.shape != x_hat_BTD.shape:
            raise ValueError(f"x {tuple(x_BTD.shape)} and x_hat {tuple(x_hat_BTD.shape)} differ in shape")
        d = x_BTD.shape[-1]
        if self.d is None:
            self.d = d
        elif d != self.d:
            raise ValueError(f"d changed between batches: {self.d} -> {d}")
        x_ND = flatten(x_BTD.detach(), 1)
        keep_N = flat_mask(mask_BT, x_ND.shape[0], x_BTD.shape[:-1])
        x_ND = x_ND.to("cpu")[keep_N].to(torch.float64)
        xh_ND = flatten(x_hat_BTD.detach(), 1).to("cpu")[keep_N].to(torch.float64)
        n = x_ND.shape[0]
        if codes_BTF is not None:
            if tuple(codes_BTF.shape[:-1]) != tuple(x_BTD.shape[:-1]):
                raise ValueError(f"codes {tuple(codes_BTF.shape)} do not match x {tuple(x_BTD.shape)}")
            c_NF = flatten(codes_BTF.detach(), 1).to("cpu")[keep_N]
            self.sum_l0 += float((c_NF != 0).sum(dim=-1, dtype=torch.float64).sum())
            self.sum_l1 += float(c_NF.abs().sum(dim=-1, dtype=torch.float64).sum())
            self.n_code_tokens += n
        if n == 0:
            return

        # pooled variance: merge this batch's per-dim mean and centred sum of squares (Chan et al.)
        mean_b = x_ND.mean(dim=0)
        centred_sq_N = (x_ND - mean_b).pow(2).sum(dim=-1)  # ‖x − x̄_batch‖², also the legacy denominator
        m2_b = (x_ND - mean_b).pow(2).sum(dim=0)
        if self.mean_D is None:
            self.mean_D, self.m2_D = mean_b, m2_b
        else:
            n_a = self.n_tokens
            delta = mean_b - self.mean_D
            tot = n_a + n
            self.mean_D = self.mean_D + delta * (n / tot)
            self.m2_D = self.m2_D + m2_b + delta.pow(2) * (n_a * n / tot)

        resid_N = (x_ND - xh_ND).pow(2).sum(dim=-1)
        norm_in_N = x_ND.norm(dim=-1)
        norm_out_N = xh_ND.norm(dim=-1)
        dot_N = (x_ND * xh_ND).sum(dim=-1)
        self.sum_resid += float(resid_N.sum())
        self.sum_ev_legacy += float(_guarded_ev(resid_N, centred_sq_N).sum())
        self.sum_cos += float((dot_N / (norm_in_N * norm_out_N).clamp_min(_COS_EPS)).sum())
        self.sum_norm_in += float(norm_in_N.sum())
        self.sum_norm_out += float(norm_out_N.sum())
        div_N = torch.where(norm_in_N.abs() < _NORM_IN_EPS, torch.ones_like(norm_in_N), norm_in_N)
        self.sum_l2_ratio += float((norm_out_N / div_N).sum())
        self.sum_xhat_sq += float(norm_out_N.pow(2).sum())
        self.sum_x_dot_xhat += float(dot_N.sum())
        self.n_tokens += n
        self.n_batches += 1

    def compute(self) -> dict[str, Any]:
        """Metrics as plain floats (None where undefined); see the module docstring for each formula."""
        n = self.n_tokens
        out: dict[str, Any] = {"n_tokens": n, "n_batches": self.n_batches}
        if n == 0:
            keys = ["explained_variance", "explained_variance_legacy", "fvu", "mse", "sse_per_token", "cossim",
                    "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"]
            out.update({k: None for k in keys})
        else:
            total = float(self.m2_D.sum())  # Σ‖x − x̄‖² over all tokens
            ev = float(_guarded_ev(self.sum_resid, total))
            out.update(
                explained_variance=ev,
                explained_variance_legacy=self.sum_ev_legacy / n,
                fvu=1.0 - ev,
                mse=self.sum_resid / (n * self.d),
                sse_per_token=self.sum_resid / n,
                cossim=self.sum_cos / n,
                l2_norm_in=self.sum_norm_in / n,
                l2_norm_out=self.sum_norm_out / n,
                l2_ratio=self.sum_l2_ratio / n,
                relative_reconstruction_bias=ratio(self.sum_xhat_sq, self.sum_x_dot_xhat),
            )
        m = self.n_code_tokens
        out["l0"] = self.sum_l0 / m if m else None
        out["l1"] = self.sum_l1 / m if m else None
        return out


class FeatureStatsAccumulator:
    """Per-latent firing counts over valid tokens: density, dead and dense shares.

    ``update(codes_BTF, mask_BT)`` counts, for each latent, the valid tokens on which it is non-zero
    (``!= 0``, as SAELens, so signed codes count too). ``density_F()`` returns the densities (float64);
    ``compute()`` the scalar summary. ``dense_threshold`` = 0.1 matches SAEBench's ``freq_over_10_percent``.
    """

    def __init__(self, width: int, dense_threshold: float = 0.1) -> None:
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if not 0.0 <= dense_threshold <= 1.0:
            raise ValueError(f"dense_threshold must be in [0, 1], got {dense_threshold}")
        self.width = width
        self.dense_threshold = dense_threshold
        self.counts_F = torch.zeros(width, dtype=torch.int64)
        self.act_sum_F = torch.zeros(width, dtype=torch.float64)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, codes_BTF: torch.Tensor, mask_BT: torch.Tensor | None = None) -> None:
        if codes_BTF.shape[-1] != self.width:
            raise ValueError(f"codes have {codes_BTF.shape[-1]} latents, accumulator width is {self.width}")
        c_NF = flatten(codes_BTF.detach(), 1)
        keep_N = flat_mask(mask_BT, c_NF.shape[0], codes_BTF.shape[:-1])
        c_NF = c_NF.to("cpu")[keep_N]
        self.counts_F += (c_NF != 0).sum(dim=0)
        self.act_sum_F += c_NF.sum(dim=0, dtype=torch.float64)
        self.n_tokens += c_NF.shape[0]

    def density_F(self) -> torch.Tensor:
        """[F] fraction of valid tokens on which each latent fired (zeros if nothing was accumulated)."""
        return self.counts_F.to(torch.float64) / max(self.n_tokens, 1)

    def mean_act_when_active_F(self) -> torch.Tensor:
        """[F] mean code value over the tokens where the latent fired (0 for dead latents)."""
        return self.act_sum_F / self.counts_F.clamp_min(1).to(torch.float64)

    def compute(self) -> dict[str, Any]:
        dens = self.density_F()
        if self.n_tokens == 0:
            return {"n_tokens": 0, "width": self.width, "dense_threshold": self.dense_threshold,
                    "dead_frac": None, "dense_frac": None, "frac_alive": None,
                    "freq_over_1_percent": None, "freq_over_10_percent": None}
        return {
            "n_tokens": self.n_tokens,
            "width": self.width,
            "dense_threshold": self.dense_threshold,
            "dead_frac": float((self.counts_F == 0).double().mean()),
            "dense_frac": float((dens > self.dense_threshold).double().mean()),
            "frac_alive": float((dens > 0).double().mean()),
            "freq_over_1_percent": float((dens > 0.01).double().mean()),
            "freq_over_10_percent": float((dens > 0.1).double().mean()),
        }


def log10_density_histogram(
    density_F: torch.Tensor | np.ndarray, bins: int = 50, lo: float = -8.0, hi: float = 0.0
) -> dict[str, Any]:
    """Histogram of log10(density) over live latents; dead latents (density 0) are counted apart.

    Returns ``{"counts": [bins], "edges": [bins + 1], "n_dead": int, "n_total": int}``; densities below
    10**lo fall in the first bin.
    """
    d = np.asarray(density_F.detach().cpu() if isinstance(density_F, torch.Tensor) else density_F,
                   dtype=np.float64)
    live = d[d > 0]
    logs = np.clip(np.log10(live), lo, hi)
    counts, edges = np.histogram(logs, bins=bins, range=(lo, hi))
    return {"counts": counts.tolist(), "edges": edges.tolist(), "n_dead": int((d <= 0).sum()),
            "n_total": int(d.size)}
