"""Next-token cross-entropy and KL of the clean, SAE-spliced, zero- and mean-ablated runs, streamed over
batches in row chunks (definitions in `trsae.metrics`)."""

from __future__ import annotations

from typing import Any

import torch

from trsae.metrics.common import flat_mask, ratio, wide


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
        keep_N = flat_mask(mask_BT, self.clean_NV.shape[0], targets_BT.shape)
        idx = torch.nonzero(keep_N, as_tuple=False).squeeze(-1).to(self.clean_NV.device)
        self.n = int(idx.numel())
        self.rows = idx.cpu()
        """The flat ``[B·T]`` indices of the scored positions, in the order of every per-position tensor here."""
        self.chunks = []  # (rows, targets, p_clean, lse_clean)
        ce_clean = []
        for s in range(0, self.n, chunk_rows):
            rows = idx[s:s + chunk_rows]
            t = tgt_N[rows]
            c = wide(self.clean_NV[rows])
            lse = torch.logsumexp(c, dim=-1)
            ce_clean.append((lse - c.gather(-1, t[:, None]).squeeze(-1)).double().cpu())
            self.chunks.append((rows, t, torch.softmax(c, dim=-1), lse))
        self.ce_clean_N = torch.cat(ce_clean) if ce_clean else torch.zeros(0, dtype=torch.float64)
        """The clean run's CE at each scored position (`rows`), float64."""
        self.ce_clean = float(self.ce_clean_N.sum())

    @torch.no_grad()
    def stats(self, logits_BTV: torch.Tensor, name: str = "other", per_position: bool = False):
        """``(n positions, Σ CE, Σ KL(clean ‖ other))`` of ``logits_BTV`` over this batch's valid positions;
        ``per_position`` appends the CE at each of them (float64, in the order of `rows`)."""
        if logits_BTV.shape != self.shape:
            raise ValueError(f"{name} logits {tuple(logits_BTV.shape)} differ from clean {tuple(self.shape)}")
        other_NV = logits_BTV.detach().reshape(-1, self.V)
        kl = 0.0
        ces = []
        for rows, t, p_clean, lse_clean in self.chunks:
            z = wide(other_NV[rows])
            lse = torch.logsumexp(z, dim=-1)
            ces.append((lse - z.gather(-1, t[:, None]).squeeze(-1)).double().cpu())
            diff = torch.sub(wide(self.clean_NV[rows]), z, out=z)  # c − z, in z's buffer
            kl += float((diff.mul_(p_clean).sum(-1) + (lse - lse_clean)).sum(dtype=torch.float64))
        ce_N = torch.cat(ces) if ces else torch.zeros(0, dtype=torch.float64)
        return (self.n, float(ce_N.sum()), kl, ce_N) if per_position else (self.n, float(ce_N.sum()), kl)


class LogitAccumulator:
    """Streams next-token CE and KL(clean ‖ variant) for the SAE-spliced, zero- and mean-ablated runs.

    ``update(clean_BTV, sae_BTV, zero_BTV, mean_BTV, targets_BT, mask_BT)``: logits ``[B, T, V]`` whose
    position t predicts ``targets_BT[:, t]`` (see ``next_token_targets``); only positions where ``mask_BT`` is
    True count. Any variant may be ``None``; each variant keeps its own count, and the clean CE is a mean over
    every update, so passing the same clean batch with one variant at a time gives the same result as passing
    all three at once. Rows are processed ``chunk_rows`` at a time in float32 (float64 logits stay float64);
    nothing outlives the call.
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
            return ratio(abl - ce["sae"], abl - ce_clean)

        def kl_score(abl: float | None) -> float | None:
            if None in (abl, kl["sae"]):
                return None
            return ratio(abl - kl["sae"], abl)

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
