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
    ("sparsity", "l0_train_mode", "L0 (training selection)"),
    ("reconstruction_quality", "explained_variance_train_mode", "explained variance (training selection)"),
    ("sparsity", "dead_frac", "dead latents"),
    ("sparsity", "dense_frac", "dense latents"),
]
"""The core table. The "training selection" rows exist for BatchTopK-style SAEs only: their codes under the batch
top-k used in training, beside the inference threshold's; dead / dense fractions are counted over the density
pass's training tokens (`trsae.evaluate.density_stats`)."""


ABLATION_ROWS = [row for row in CORE_ROWS if row[1] in
                 ("explained_variance", "kl_div_score", "ce_loss_score", "ce_loss_score_mean_ablation")]


PER_TOKEN = ("TopK", "BatchTopK", "JumpReLU", "Matryoshka")
"""The per-token baselines at matched L0 (k), among which the strongest is named."""
TWINS = {"TRSAE": "TopK", "TRSAE-BatchTopK": "BatchTopK"}
"""Each TRSAE and the per-token SAE of the same sparsity it is compared with (same width, k, seed). No JumpReLU
TRSAE: JumpReLU's L0 drifts from its target (39 for 32 in the cpu profile), so neither it nor a TRSAE on it sits at
the matched L0 these comparisons are about (JumpReLU stays among the per-token baselines)."""
INTERP_SAES = ("TopK", "TRSAE")
"""The SAEs notebook 04 evaluates: its syntax, probing and GAP passes cost minutes per SAE and seed, so it takes
the TopK TRSAE and its twin only."""
CEILING_SAES = (*TWINS.values(), *TWINS)
"""The TRSAEs and twins whose dictionaries get the amortisation ceiling (`trsae.pursuit`, at exactly k codes a
token: TopK holds L0 = k on every token, BatchTopK on average)."""
CEILING_ROWS = [("ceiling", "fvu_encoder", "FVU, own encoder"), ("ceiling", "fvu_pursuit", "FVU, pursuit (ceiling)"),
                ("ceiling", "pursuit_ratio", "pursuit / encoder FVU"), ("ceiling", "l0_pursuit", "L0, pursuit")]
GAP_ROWS = [("ceiling", "amortisation_gap", "twin's amortisation gap (FVU)"),
            ("ceiling", "temporal_gain", "FVU the temporal encoder gains"),
            ("ceiling", "gap_closed", "share of the gap closed")]
"""Rows of `trsae.analysis.amortisation`: per dictionary, and per TRSAE against its twin's dictionary."""
CODE_ROWS = [("temporal_codes", "persistence", "codes also active at t-1 (share)"),
             ("temporal_codes", "novel_l0", "novel L0 (codes switching on)")]
"""Temporal structure of the codes (`trsae.metrics.persistence`), for every SAE."""
PAIRED_ROWS = [("paired", "fvu_ratio", "FVU ratio"), ("paired", "ce_gap_ratio", "CE-gap ratio"),
               ("paired", "d_ev", "EV difference"), ("paired", "d_ce", "CE-loss score difference")]
"""Rows of the seed-paired comparisons (`trsae.analysis.paired`)."""


def baseline_specs(d_in: int, width: int, k: int, l1_coeff: float | None = None,
                   jumprelu_l0_coeff: float | None = None) -> dict[str, SAEConfig]:
    """The per-token baselines at one width: ReLU + L1 (its L0 follows from ``l1_coeff``), and at L0 = k TopK,
    BatchTopK, JumpReLU (k its target mean L0, ``jumprelu_l0_coeff`` the weight of its penalty around k; None: the
    part's default) and Matryoshka BatchTopK."""
    relu_kw = {} if l1_coeff is None else {"l1_coeff": l1_coeff}
    jump_kw = {} if jumprelu_l0_coeff is None else {"l0_coeff": jumprelu_l0_coeff}
    return {"ReLU-L1": SAEConfig.build(d_in, width, "relu", **relu_kw),
            "TopK": SAEConfig.build(d_in, width, "topk", k=k),
            "BatchTopK": SAEConfig.build(d_in, width, "batchtopk", k=k),
            "JumpReLU": SAEConfig.build(d_in, width, "jumprelu", k=k, **jump_kw),
            "Matryoshka": SAEConfig.build(d_in, width, "matryoshka", k=k)}


def k_sweep(cfg: SAEConfig, ks: list[int]) -> list[SAEConfig]:
    """``cfg`` at every k of ``ks`` (in increasing order), for a sparsity frontier."""
    return [cfg.replace(k=kk) for kk in sorted(ks)]


def l1_sweep(cfg: SAEConfig, mults: list[float]) -> list[SAEConfig]:
    """``cfg`` with its L1 coefficient times every factor of ``mults`` (in increasing order)."""
    return [cfg.replace(l1_coeff=cfg.sparsity.l1_coeff * m) for m in sorted(mults)]


def temporal_specs(d_in: int, width: int, k: int, window: int, curriculum_frac: float = 0.3,
                   jumprelu_l0_coeff: float | None = None, **trsae_kw) -> dict[str, SAEConfig]:
    """The matched-L0 comparison (k): the per-token baselines of `PER_TOKEN` (as `baseline_specs` makes them), a
    TRSAE encoder on each sparsity of `TWINS` ("TRSAE" is the TopK one), and "TopK-wide", a TopK whose wider
    dictionary holds as many parameters as the TopK TRSAE."""
    base = baseline_specs(d_in, width, k, jumprelu_l0_coeff=jumprelu_l0_coeff)
    specs = {name: base[name] for name in PER_TOKEN}
    for name, twin in TWINS.items():
        specs[name] = base[twin].replace(encoder="trsae", window=window, curriculum_frac=curriculum_frac, **trsae_kw)
    n_tr = make_sae(specs["TRSAE"]).n_params()
    per_latent = 2 * d_in + 1  # W_enc column, W_dec row, b_enc entry; b_dec is d_in once
    specs["TopK-wide"] = SAEConfig.build(d_in, round((n_tr - d_in) / per_latent), "topk", k=k)
    return specs


def ablation_specs(d_in: int, width: int, k: int, window: int, windows: list[int],
                   curriculum_frac: float = 0.3, pred_k: int = 0, **trsae_kw) -> dict[str, SAEConfig]:
    """The full TRSAE, each temporal component removed in turn, a sweep of the window w, and the look-ahead
    (acausal) variant, clearly labelled as a reference: codes there see future tokens. One entry per distinct
    model: removing the attention is the window w = 0 (bitwise the same training), so it appears once, as "w=0";
    "gates fixed open" removes the gates and with them the gate penalty (a TRSAE's gates only re-parametrise U,
    so what this removes is the penalty's pressure to close them). With ``pred_k``, also the full model with the
    selective temporal decoder (`DECODER_VARIANT`: pred_k predicted and k - pred_k novel codes)."""
    full = SAEConfig.build(d_in, width, "topk", "trsae", k=k, window=window, curriculum_frac=curriculum_frac,
                           **trsae_kw)
    specs = {"full": full,
             "no position emb.": full.replace(use_pos=False),
             "gates fixed open": full.replace(use_gates=False),
             "no curriculum": full.replace(curriculum_frac=0.0),
             "look-ahead (reference)": full.replace(causal=False)}
    for w in windows:
        if w != window:  # the full model is the sweep's point at its own window
            specs[f"w={w}"] = full.replace(window=w, w_start=min(full.encoder.w_start, w))
    if pred_k:  # an addition, not a removal: the selective temporal decoder at the same total L0
        specs[DECODER_VARIANT] = full.replace(pred_k=pred_k, k=k - pred_k)
    return specs


DECODER_VARIANT = "with selective decoder"
"""The `ablation_specs` entry that adds the selective temporal decoder (`field_specs`' "TRSAE-pred")."""


ABLATION_COMPONENTS = ("no position emb.", "w=0", "gates fixed open", "no curriculum")
"""The ablations that each remove one temporal component ("w=0": the attention), by their `ablation_specs` names."""
ABLATION_EFFECT_ROWS = [("paired", "d_ev", "EV, full minus ablated"),
                        ("paired", "d_ce", "CE-loss score, full minus ablated")]


FIELD = ("T-SAE", "TFA", "TRSAE-pred")
"""The field's temporal SAEs and the TRSAE's selective temporal decoder, beside the comparison of `temporal_specs`."""
FIELD_ROWS = [("sparsity", "l0", "L0 (every non-zero code)"), ("sparsity", "l0_novel", "L0 (novel codes only)"),
              ("reconstruction_quality", "explained_variance", "explained variance (pooled)"),
              ("model_performance_preservation", "ce_loss_score", "CE-loss score (zero abl.)"),
              ("model_behavior_preservation", "kl_div_score", "KL-divergence score"),
              ("temporal_codes", "persistence", "codes also active at t-1 (share)"),
              ("temporal_codes", "novel_l0", "novel L0 (codes switching on)")]
"""Rows of the field comparison's table: both L0 counts (they differ only where codes are predicted)."""
FIELD_VERSUS_ROWS = [("paired", "fvu_ratio", "FVU ratio to the strongest per-token SAE"),
                     ("paired", "ce_gap_ratio", "CE-gap ratio to the strongest per-token SAE"),
                     ("matched", "fvu_ratio", "FVU ratio to TopK at the same L0 (its k frontier)"),
                     ("matched", "ce_gap_ratio", "CE-gap ratio to TopK at the same L0 (its k frontier)"),
                     ("ceiling", "gap_closed", "share of TopK's amortisation gap closed")]
"""Rows of `trsae.analysis.field_versus` (``matched``: with its ``frontier``; empty outside the frontier's L0)."""


def field_specs(d_in: int, width: int, k: int, window: int, curriculum_frac: float = 0.3, pred_k: int | None = None,
                **trsae_kw) -> dict[str, SAEConfig]:
    """The published temporal SAEs and the selective temporal decoder, at the width and L0 k of `temporal_specs`:

    - "T-SAE" (Bhalla et al. 2026): a Matryoshka BatchTopK whose inner level is the 20 % "high-level" share, plus
      the contrastive loss on those latents, at the authors' settings (`trsae.saes.tsae`); L0 k.
    - "TFA" (Lubana et al. 2025) as published: k novel codes and a dense prediction (`trsae.saes.tfa`), so its L0
      counting every code is far above k; its novel L0 is k.
    - "TRSAE-pred": the TRSAE (its encoder as in `temporal_specs`) with the selective temporal decoder: ``pred_k``
      codes predicted from its attention context, decoded through the dictionary and counted, and k - pred_k novel
      codes.

    ``pred_k`` defaults to k // 4."""
    pred_k = k // 4 if pred_k is None else pred_k
    if not 0 < pred_k < k:
        raise ValueError(f"pred_k={pred_k} must be in 1 .. k-1 = {k - 1}: the novel codes get k - pred_k")
    return {"T-SAE": SAEConfig.build(d_in, width, "matryoshka", "tsae", k=k, prefix_fracs=[0.2],
                                     level_weights=[0.25], high_frac=0.2),
            "TFA": SAEConfig.build(d_in, width, "topk", "tfa", k=k),
            "TRSAE-pred": SAEConfig.build(d_in, width, "topk", "trsae", k=k - pred_k, pred_k=pred_k, window=window,
                                          curriculum_frac=curriculum_frac, **trsae_kw)}


CONTRAST_ROWS = [("sparsity", "l0", "L0"),
                 ("reconstruction_quality", "explained_variance", "explained variance (pooled)"),
                 ("model_performance_preservation", "ce_loss_score", "CE-loss score (zero abl.)"),
                 ("temporal_codes", "persistence", "codes also active at t-1 (share)")]
"""Rows of T-SAE's contrastive-weight sweep (`contrast_sweep`), read on the val split: what the weight trades."""


def contrast_sweep(cfg: SAEConfig, mults: list[float]) -> dict[str, SAEConfig]:
    """T-SAE (``cfg``, at the authors' weight) with its contrastive weight times each of ``mults`` (0: none),
    named "x<mult>" in increasing order; "x1" is ``cfg`` itself."""
    return {f"x{m:g}": cfg.replace(contrast_coeff=cfg.encoder.contrast_coeff * m) for m in sorted(mults)}


LENGTH_PAIR = ("TRSAE", "TopK")
"""The training-length curve and the second model compare the TopK TRSAE with its twin, TopK: the strongest
per-token baseline of the cpu profile's comparison (02 prints which baseline is strongest in the profile run)."""
VERSUS_ROWS = [("versus", "fvu_b", "FVU, TopK"), ("versus", "fvu_a", "FVU, TRSAE"),
               ("versus", "ce_b", "CE-loss score, TopK"), ("versus", "ce_a", "CE-loss score, TRSAE"),
               ("paired", "fvu_ratio", "FVU ratio"), ("paired", "ce_gap_ratio", "CE-gap ratio")]
"""Rows of `trsae.analysis.versus` for `LENGTH_PAIR` ("a" is the TRSAE, "b" TopK)."""
LENGTH_ROWS = VERSUS_ROWS + [("versus", "train_fvu_b", "train-split FVU, TopK"),
                             ("versus", "train_fvu_a", "train-split FVU, TRSAE")]
"""`VERSUS_ROWS` with the train-split FVU that the training-length curve also reads (overfitting would show as
the train-split FVU falling further below the test split's past one epoch than under it)."""
SITE_ROWS = [("versus", "fvu_b", "FVU, TopK"), ("versus", "fvu_a", "FVU, TRSAE"), ("paired", "fvu_ratio", "FVU ratio"),
             ("versus", "ce_b", "CE-loss score, TopK"), ("paired", "ce_gap_ratio", "CE-gap ratio"),
             ("ceiling", "amortisation_gap", "TopK's amortisation gap (FVU)"),
             ("ceiling", "gap_closed", "share of TopK's amortisation gap closed"),
             ("concentration", "top_token_share", "centred variance in the top 1% of tokens")]
"""Rows of the site map (`trsae.runner.site_map` of `LENGTH_PAIR`, one column per model, layer and site)."""
CE_SPLIT_ROWS = [("split", "token_share", "share of the scored positions"),
                 ("split", "gap_share", "share of TopK's CE gap"),
                 ("split", "ratio", "CE-gap ratio, TRSAE / TopK")]
"""Rows of a `trsae.analysis.ce_gap_split` table, one column per position bucket or frequency class."""
