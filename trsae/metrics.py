"""Core SAE metrics (SAEBench / SAELens definitions), streamed over batches.

Pure torch + numpy + json: nothing here imports the model, data or SAE layers. The caller runs the model
(clean, SAE-spliced, zero- and mean-ablated) and feeds tensors batch by batch; each accumulator keeps only
float64 sums, so memory is bounded by one batch (logits are processed in row chunks; only the current batch's
clean softmax is kept, while its variants are scored).

Definitions (checked against SAELens ``sae_lens/evals.py`` at decoderesearch/SAELens 191d44e and SAEBench
``sae_bench/evals/core/main.py`` at adamkarvonen/SAEBench 10e0728). N = valid tokens, x, x̂ ∈ R^D per token:

- ``explained_variance`` (pooled, SAELens' current ``ExplainedVarianceCalculator``):
  1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean over *all* evaluated tokens. SAELens forms E‖x‖² − ‖E x‖²;
  here per-dimension mean and centred sum of squares are merged across batches (Chan et al.), in float64,
  which avoids the cancellation that form suffers when activations have a large mean. If the total variance
  is < 1e-10 the value is 1 when the residual is also < 1e-10, else 0 (SAELens' guard).
- ``explained_variance_legacy`` (SAELens ``explained_variance_legacy``, and what SAEBench 0125 reports as
  ``explained_variance``): mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄_b‖², where x̄_b is the mean of the
  valid tokens *of the same batch* (one ``update`` call). It therefore depends on the batching. A token
  whose denominator is 0 (e.g. a one-token batch) gets the same guard as above instead of inf / NaN.
- ``mse``: Σ‖x − x̂‖² / (N·D), mean over tokens and dimensions. ``sse_per_token`` = Σ‖x − x̂‖² / N is
  SAELens' current ``mse`` convention (sum over dims, mean over tokens). (SAEBench 0125's ``mse`` divided
  each token's sum by the batch's token count; we do not reproduce that.)
- ``cossim``: mean per-token cos(x, x̂); a zero vector gives 0 here (SAELens would give NaN).
- ``l2_norm_in`` / ``l2_norm_out``: mean ‖x‖, mean ‖x̂‖. ``l2_ratio``: mean per-token ‖x̂‖ / ‖x‖, with
  ‖x‖ < 1e-4 replaced by 1 (SAEBench).
- ``relative_reconstruction_bias``: E‖x̂‖² / E[x·x̂] (Rajamanoharan et al. 2024, eq. 10) pooled over all
  tokens. SAEBench takes this ratio per batch and averages the batch ratios; pooling makes it independent
  of batching and equal to SAEBench's value when there is one batch.
- ``l0``: mean number of non-zero codes per token; ``l1``: mean Σ|codes| per token (SAELens, abs()).
- ``fvu`` = 1 − explained_variance (pooled).
- Feature density: fraction of valid tokens on which a latent is non-zero. ``dead_frac``: share of latents
  that never fired; ``dense_frac``: share with density > ``dense_threshold`` (default 0.1, i.e. SAEBench's
  ``freq_over_10_percent``); ``frac_alive``, ``freq_over_1_percent`` and ``freq_over_10_percent`` as SAEBench.
- CE: mean next-token cross-entropy (nats) over valid positions; KL(clean ‖ other) = Σ_v p_clean
  (log p_clean − log p_other), mean over valid positions. ``ce_loss_score`` = (CE_abl − CE_sae) /
  (CE_abl − CE_clean) and ``kl_div_score`` = (KL_abl − KL_sae) / KL_abl (SAEBench), with zero ablation;
  the ``*_mean_ablation`` variants use the mean-ablated run in place of the zero-ablated one.

An undefined value (nothing accumulated, or a zero denominator in a score) is ``None``, which JSON stores
as ``null``; ``aggregate_seeds`` skips it and reports how many seeds had a value.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trsae.io import atomic_write_text

__all__ = [
    "ReconstructionAccumulator",
    "FeatureStatsAccumulator",
    "CleanLogits",
    "LogitAccumulator",
    "log10_density_histogram",
    "next_token_targets",
    "core_results",
    "aggregate_seeds",
    "to_jsonable",
    "write_json_atomic",
]

_EV_EPS = 1e-10  # SAELens' guard on a vanishing total variance
_NORM_IN_EPS = 1e-4  # SAEBench: ‖x‖ below this is replaced by 1 in l2_ratio
_COS_EPS = 1e-12


def _flatten(t: torch.Tensor, n_trailing: int) -> torch.Tensor:
    """[..., *trailing] -> [N, *trailing]."""
    lead = t.shape[: t.dim() - n_trailing]
    return t.reshape(int(np.prod(lead, dtype=np.int64)) if len(lead) else 1, *t.shape[t.dim() - n_trailing:])


def _flat_mask(mask: torch.Tensor | None, n: int, lead_shape: torch.Size) -> torch.Tensor:
    """Boolean mask over the flattened leading dims; ``None`` means every token is valid."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool)
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match leading dims {tuple(lead_shape)}")
    return mask.reshape(-1).to(device="cpu", dtype=torch.bool)


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 or not math.isfinite(den) else num / den


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
        x_ND = _flatten(x_BTD.detach(), 1)
        keep_N = _flat_mask(mask_BT, x_ND.shape[0], x_BTD.shape[:-1])
        x_ND = x_ND.to("cpu")[keep_N].to(torch.float64)
        xh_ND = _flatten(x_hat_BTD.detach(), 1).to("cpu")[keep_N].to(torch.float64)
        n = x_ND.shape[0]
        if codes_BTF is not None:
            if tuple(codes_BTF.shape[:-1]) != tuple(x_BTD.shape[:-1]):
                raise ValueError(f"codes {tuple(codes_BTF.shape)} do not match x {tuple(x_BTD.shape)}")
            c_NF = _flatten(codes_BTF.detach(), 1).to("cpu")[keep_N]
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
                relative_reconstruction_bias=_ratio(self.sum_xhat_sq, self.sum_x_dot_xhat),
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
        c_NF = _flatten(codes_BTF.detach(), 1)
        keep_N = _flat_mask(mask_BT, c_NF.shape[0], codes_BTF.shape[:-1])
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


def next_token_targets(tokens_BT: torch.Tensor, valid_BT: torch.Tensor | None = None):
    """Targets and mask for next-token loss: logits at t predict ``tokens[t + 1]``.

    Returns ``(targets_BT, mask_BT)``: ``targets[:, t] = tokens[:, t + 1]`` (last column 0, masked), and
    ``mask[:, t] = valid[:, t] & valid[:, t + 1]``: both the position read (e.g. not BOS, where the SAE is not
    spliced) and the token predicted (e.g. not padding) must be valid.
    """
    targets = torch.zeros_like(tokens_BT)
    targets[:, :-1] = tokens_BT[:, 1:]
    if valid_BT is None:
        valid_BT = torch.ones_like(tokens_BT, dtype=torch.bool)
    valid_BT = valid_BT.to(torch.bool)
    mask = torch.zeros_like(valid_BT)
    mask[:, :-1] = valid_BT[:, :-1] & valid_BT[:, 1:]
    return targets, mask


_VARIANTS = ("sae", "zero", "mean")


class CleanLogits:
    """The clean run's share of next-token CE and KL for one batch, computed once and reused by every variant.

    ``CleanLogits(clean_BTV, targets_BT, mask_BT)`` keeps, per chunk of valid positions, p_clean and the clean
    log-normaliser; ``stats(other_BTV)`` then gives ``(n, Σ CE, Σ KL(clean ‖ other))`` over those positions
    without a log-softmax of its own: CE = lse(z) − z_target and KL = Σ_v p_clean (c − z) + lse(z) − lse(c)
    for clean logits c and other logits z (Σ p_clean = 1). Evaluating many SAEs on one batch thus pays the
    clean softmax once, and the zero- and mean-ablated runs once, instead of once per SAE.
    """

    def __init__(self, clean_logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                 mask_BT: torch.Tensor | None = None, chunk_rows: int = 256) -> None:
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        if tuple(targets_BT.shape) != tuple(clean_logits_BTV.shape[:-1]):
            raise ValueError(f"targets {tuple(targets_BT.shape)} do not match logits "
                             f"{tuple(clean_logits_BTV.shape)}")
        self.shape = clean_logits_BTV.shape
        self.V = clean_logits_BTV.shape[-1]
        self.clean_NV = clean_logits_BTV.detach().reshape(-1, self.V)
        tgt_N = targets_BT.reshape(-1).to(self.clean_NV.device, torch.long)
        keep_N = _flat_mask(mask_BT, self.clean_NV.shape[0], targets_BT.shape)
        idx = torch.nonzero(keep_N, as_tuple=False).squeeze(-1).to(self.clean_NV.device)
        self.n = int(idx.numel())
        self.chunks = []  # (rows, targets, p_clean, lse_clean)
        self.ce_clean = 0.0
        for s in range(0, self.n, chunk_rows):
            rows = idx[s:s + chunk_rows]
            t = tgt_N[rows]
            c = self.clean_NV[rows].float()
            lse = torch.logsumexp(c, dim=-1)
            self.ce_clean += float((lse - c.gather(-1, t[:, None]).squeeze(-1)).sum(dtype=torch.float64))
            self.chunks.append((rows, t, torch.softmax(c, dim=-1), lse))

    @torch.no_grad()
    def stats(self, logits_BTV: torch.Tensor, name: str = "other") -> tuple[int, float, float]:
        """``(n positions, Σ CE, Σ KL(clean ‖ other))`` of ``logits_BTV`` over this batch's valid positions."""
        if logits_BTV.shape != self.shape:
            raise ValueError(f"{name} logits {tuple(logits_BTV.shape)} differ from clean {tuple(self.shape)}")
        other_NV = logits_BTV.detach().reshape(-1, self.V)
        ce = kl = 0.0
        for rows, t, p_clean, lse_clean in self.chunks:
            z = other_NV[rows].float()
            lse = torch.logsumexp(z, dim=-1)
            ce += float((lse - z.gather(-1, t[:, None]).squeeze(-1)).sum(dtype=torch.float64))
            diff = torch.sub(self.clean_NV[rows].float(), z, out=z)  # c − z, in z's buffer
            kl += float((diff.mul_(p_clean).sum(-1) + (lse - lse_clean)).sum(dtype=torch.float64))
        return self.n, ce, kl


class LogitAccumulator:
    """Streams next-token CE and KL(clean ‖ variant) for the SAE-spliced, zero- and mean-ablated runs.

    ``update(clean_BTV, sae_BTV, zero_BTV, mean_BTV, targets_BT, mask_BT)``: logits ``[B, T, V]`` whose
    position t predicts ``targets_BT[:, t]`` (see ``next_token_targets``); only positions where ``mask_BT`` is
    True count. Any variant may be ``None``; each variant keeps its own count, and the clean CE is a mean over
    every update, so passing the same clean batch with one variant at a time gives the same result as passing
    all three at once. Rows are processed ``chunk_rows`` at a time in float32; nothing outlives the call.
    Several accumulators fed from one batch share the work: build one `CleanLogits`, then ``add_clean`` and
    ``add`` each variant's ``stats`` (the ablated runs' once for all of them).
    """

    def __init__(self, chunk_rows: int = 256) -> None:
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self.chunk_rows = chunk_rows
        self.n_clean = 0
        self.ce_clean = 0.0
        self.n = {v: 0 for v in _VARIANTS}
        self.ce = {v: 0.0 for v in _VARIANTS}
        self.kl = {v: 0.0 for v in _VARIANTS}

    def add_clean(self, ref: CleanLogits) -> None:
        self.n_clean += ref.n
        self.ce_clean += ref.ce_clean

    def add(self, variant: str, stats: tuple[int, float, float]) -> None:
        """Add one batch's ``CleanLogits.stats`` of ``variant`` ("sae", "zero" or "mean")."""
        if variant not in _VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {_VARIANTS}")
        n, ce, kl = stats
        self.n[variant] += n
        self.ce[variant] += ce
        self.kl[variant] += kl

    @torch.no_grad()
    def update(
        self,
        clean_logits_BTV: torch.Tensor,
        sae_logits_BTV: torch.Tensor | None,
        zero_logits_BTV: torch.Tensor | None,
        mean_logits_BTV: torch.Tensor | None,
        targets_BT: torch.Tensor,
        mask_BT: torch.Tensor | None = None,
    ) -> None:
        ref = CleanLogits(clean_logits_BTV, targets_BT, mask_BT, self.chunk_rows)
        variants = {k: v for k, v in zip(_VARIANTS, (sae_logits_BTV, zero_logits_BTV, mean_logits_BTV))
                    if v is not None}
        stats = {name: ref.stats(lg, name) for name, lg in variants.items()}  # all, before any is added
        self.add_clean(ref)
        for name, st in stats.items():
            self.add(name, st)

    def compute(self) -> dict[str, Any]:
        def mean(total: float, n: int) -> float | None:
            return total / n if n else None

        ce_clean = mean(self.ce_clean, self.n_clean)
        ce = {k: mean(self.ce[k], self.n[k]) for k in _VARIANTS}
        kl = {k: mean(self.kl[k], self.n[k]) for k in _VARIANTS}

        def ce_score(abl: float | None) -> float | None:
            if None in (abl, ce["sae"], ce_clean):
                return None
            return _ratio(abl - ce["sae"], abl - ce_clean)

        def kl_score(abl: float | None) -> float | None:
            if None in (abl, kl["sae"]):
                return None
            return _ratio(abl - kl["sae"], abl)

        return {
            # positions per run: with one variant per update call the clean run is seen several times
            "n_positions": max([self.n[k] for k in _VARIANTS] + [0]) or self.n_clean,
            "ce_loss_without_sae": ce_clean,
            "ce_loss_with_sae": ce["sae"],
            "ce_loss_with_ablation": ce["zero"],
            "ce_loss_with_mean_ablation": ce["mean"],
            "ce_loss_score": ce_score(ce["zero"]),
            "ce_loss_score_mean_ablation": ce_score(ce["mean"]),
            "kl_div_with_sae": kl["sae"],
            "kl_div_with_ablation": kl["zero"],
            "kl_div_with_mean_ablation": kl["mean"],
            "kl_div_score": kl_score(kl["zero"]),
            "kl_div_score_mean_ablation": kl_score(kl["mean"]),
        }


def core_results(
    recon: dict[str, Any],
    logits: dict[str, Any] | None = None,
    feats: dict[str, Any] | None = None,
    *,
    config: dict[str, Any] | None = None,
    token_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the seed / SAEBench-shaped results dict from the accumulators' ``compute()`` outputs.

    Sections whose source is missing (``logits`` or ``feats`` None) are left out, as SAEBench drops empty
    metric groups. ``token_stats`` defaults to the token counts the accumulators saw; ``config`` is copied in.
    """
    out: dict[str, Any] = {}
    if logits is not None:
        out["model_behavior_preservation"] = {
            k: logits[k] for k in ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae",
                                   "kl_div_score_mean_ablation", "kl_div_with_mean_ablation")
        }
        out["model_performance_preservation"] = {
            k: logits[k] for k in ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                   "ce_loss_without_sae", "ce_loss_score_mean_ablation",
                                   "ce_loss_with_mean_ablation")
        }
    out["reconstruction_quality"] = {
        k: recon[k] for k in ("explained_variance", "explained_variance_legacy", "mse", "cossim", "fvu",
                              "sse_per_token")
    }
    out["shrinkage"] = {k: recon[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio",
                                              "relative_reconstruction_bias")}
    out["sparsity"] = {"l0": recon["l0"], "l1": recon["l1"]}
    if feats is not None:
        out["sparsity"].update(dead_frac=feats["dead_frac"], dense_frac=feats["dense_frac"])
        out["misc_metrics"] = {k: feats[k] for k in ("frac_alive", "freq_over_1_percent",
                                                     "freq_over_10_percent", "dense_threshold")}
    if token_stats is None:
        token_stats = {"total_tokens_eval_sparsity_variance": recon["n_tokens"]}
        if logits is not None:
            token_stats["total_tokens_eval_reconstruction"] = logits["n_positions"]
        if feats is not None:
            token_stats["total_tokens_feature_stats"] = feats["n_tokens"]
    out["token_stats"] = dict(token_stats)
    out["config"] = dict(config or {})
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _aggregate_leaf(values: list[Any], keep: bool) -> Any:
    present = [v for v in values if v is not None]
    if not keep and present and all(_is_number(v) for v in present):
        xs = np.array([float(v) for v in present if math.isfinite(float(v))], dtype=np.float64)
        n = int(xs.size)
        if n == 0:
            return {"mean": None, "se": None, "n": 0, "values": []}
        se = float(xs.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        return {"mean": float(xs.mean()), "se": se, "n": n, "values": xs.tolist()}
    first = values[0]
    return first if all(v == first for v in values) else list(values)


def aggregate_seeds(results: list[dict[str, Any]], keep: tuple[str, ...] = ("config",)) -> dict[str, Any]:
    """Combine per-seed results of the same nesting into mean and standard error.

    Every numeric leaf becomes ``{"mean", "se", "n", "values"}``: ``se`` = sample std (ddof = 1) / √n, and 0
    when n = 1; ``None`` and non-finite values are skipped (``n`` counts the seeds that had a value). Other
    leaves, and every leaf under a top-level key in ``keep`` (the config), are kept as one value if equal
    across seeds, else as the list of per-seed values. A key missing from some seeds counts as ``None``.
    """
    if not results:
        raise ValueError("aggregate_seeds needs at least one result")

    def rec(nodes: list[Any], keep_here: bool) -> Any:
        if all(isinstance(x, dict) for x in nodes if x is not None) and any(isinstance(x, dict) for x in nodes):
            keys: list[str] = []
            for x in nodes:
                for k in (x or {}):
                    if k not in keys:
                        keys.append(k)
            return {k: rec([(x or {}).get(k) for x in nodes], keep_here) for k in keys}
        return _aggregate_leaf(nodes, keep_here)

    keys: list[str] = []
    for r in results:
        keys += [k for k in r if k not in keys]
    return {k: rec([r.get(k) for r in results], k in keep) for k in keys}


def to_jsonable(obj: Any) -> Any:
    """Tensors, numpy values, paths and tuples to plain JSON types; NaN / ±inf to ``None``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False) + "\n"
    atomic_write_text(path, text)
    return path
