"""What the notebooks compare: the SAE configs of each experiment, and the rows of metrics their tables show."""

from __future__ import annotations

from trsae.saes import SAEConfig, make_sae

CORE_ROWS = [
    ("training", "step", "training steps"),
    ("sparsity", "l0", "L0"),
    ("reconstruction_quality", "explained_variance", "explained variance (pooled)"),
    ("reconstruction_quality", "explained_variance_legacy", "explained variance (legacy)"),
    ("reconstruction_quality", "cossim", "cosine similarity"),
    ("shrinkage", "l2_ratio", "l2 ratio"),
    ("model_behavior_preservation", "kl_div_score", "KL-divergence score"),
    ("model_performance_preservation", "ce_loss_score", "CE-loss score (zero abl.)"),
    ("model_performance_preservation", "ce_loss_score_mean_ablation", "CE-loss score (mean abl.)"),
    ("sparsity", "dead_frac", "dead latents (eval)"),
]


ABLATION_ROWS = [row for row in CORE_ROWS if row[1] in
                 ("explained_variance", "kl_div_score", "ce_loss_score", "ce_loss_score_mean_ablation", "dead_frac")]


def baseline_specs(d_in: int, width: int, k: int, l1_coeff: float | None = None) -> dict[str, SAEConfig]:
    """The three baselines at one width: ReLU + L1 (its L0 follows from ``l1_coeff``), TopK and BatchTopK."""
    relu_kw = {} if l1_coeff is None else {"l1_coeff": l1_coeff}
    return {"ReLU-L1": SAEConfig.build(d_in, width, "relu", **relu_kw),
            "TopK": SAEConfig.build(d_in, width, "topk", k=k),
            "BatchTopK": SAEConfig.build(d_in, width, "batchtopk", k=k)}


def k_sweep(cfg: SAEConfig, ks: list[int]) -> list[SAEConfig]:
    """``cfg`` at every k of ``ks`` (in increasing order), for a sparsity frontier."""
    return [cfg.replace(k=kk) for kk in sorted(ks)]


def l1_sweep(cfg: SAEConfig, mults: list[float]) -> list[SAEConfig]:
    """``cfg`` with its L1 coefficient times every factor of ``mults`` (in increasing order)."""
    return [cfg.replace(l1_coeff=cfg.sparsity.l1_coeff * m) for m in sorted(mults)]


def temporal_specs(d_in: int, width: int, k: int, window: int, curriculum_frac: float = 0.3,
                   **trsae_kw) -> dict[str, SAEConfig]:
    """TRSAE and the baselines it is compared with at matched L0 (k): TopK and BatchTopK at the same width,
    and "TopK-wide", a TopK whose wider dictionary holds as many parameters as the TRSAE."""
    tr = SAEConfig.build(d_in, width, "topk", "trsae", k=k, window=window, curriculum_frac=curriculum_frac,
                         **trsae_kw)
    n_tr = make_sae(tr).n_params()
    per_latent = 2 * d_in + 1  # W_enc column, W_dec row, b_enc entry; b_dec is d_in once
    wide = round((n_tr - d_in) / per_latent)
    return {"TopK": SAEConfig.build(d_in, width, "topk", k=k),
            "BatchTopK": SAEConfig.build(d_in, width, "batchtopk", k=k),
            "TopK-wide": SAEConfig.build(d_in, wide, "topk", k=k),
            "TRSAE": tr}


def ablation_specs(d_in: int, width: int, k: int, window: int, windows: list[int],
                   curriculum_frac: float = 0.3, **trsae_kw) -> dict[str, SAEConfig]:
    """The full TRSAE, each temporal component removed in turn, a sweep of the window w, and the look-ahead
    (acausal) variant, clearly labelled as a reference: codes there see future tokens."""
    full = SAEConfig.build(d_in, width, "topk", "trsae", k=k, window=window, curriculum_frac=curriculum_frac,
                           **trsae_kw)
    specs = {"full": full,
             "no position emb.": full.replace(use_pos=False),
             "no attention": full.replace(use_attn=False),
             "gates always on": full.replace(use_gates=False),
             "no curriculum": full.replace(curriculum_frac=0.0),
             "look-ahead (reference)": full.replace(causal=False)}
    for w in windows:
        specs[f"w={w}"] = full.replace(window=w, w_start=min(full.encoder.w_start, w))
    return specs
