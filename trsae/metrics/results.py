"""The results dict of one evaluation (SAEBench-shaped sections) and its aggregation over seeds."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def core_results(
    recon: dict[str, Any],
    logits: dict[str, Any] | None = None,
    feats: dict[str, Any] | None = None,
    *,
    config: dict[str, Any] | None = None,
    token_stats: dict[str, Any] | None = None,
    train_mode: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the seed / SAEBench-shaped results dict from the accumulators' ``compute()`` outputs.

    Sections whose source is missing (``logits`` or ``feats`` None) are left out, as SAEBench drops empty
    metric groups. ``token_stats`` defaults to the token counts the accumulators saw; ``config`` is copied in.

    ``feats`` may come from other tokens than ``recon`` (`trsae.evaluate` counts dead / dense latents on a long
    pass over the train split): its token count is ``sparsity.n_tokens_density``. ``train_mode`` (``{"l0",
    "explained_variance"}`` of the codes with the training selection, for calibrated sparsities such as
    BatchTopK) adds ``sparsity.l0_train_mode`` and ``reconstruction_quality.explained_variance_train_mode``.
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
        out["sparsity"].update(dead_frac=feats["dead_frac"], dense_frac=feats["dense_frac"],
                               n_tokens_density=feats["n_tokens"])
        out["misc_metrics"] = {k: feats[k] for k in ("frac_alive", "freq_over_1_percent",
                                                     "freq_over_10_percent", "dense_threshold")}
    if train_mode is not None:
        out["sparsity"]["l0_train_mode"] = train_mode["l0"]
        out["reconstruction_quality"]["explained_variance_train_mode"] = train_mode["explained_variance"]
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
