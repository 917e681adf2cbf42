"""Core SAE metrics (SAEBench / SAELens definitions), streamed over batches.

Pure torch + numpy: nothing here imports the model, data or SAE layers. The caller runs the model
(clean, SAE-spliced, zero- and mean-ablated) and feeds tensors batch by batch; each accumulator keeps only
float64 sums, so memory is bounded by one batch (logits are processed in row chunks; only the current batch's
clean softmax is kept, while its variants are scored).

Definitions (checked against SAELens ``sae_lens/evals.py`` at decoderesearch/SAELens 191d44e, the ablation
positions again against sae-lens 6.54.12 as installed, and SAEBench
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
  `trsae.evaluate` accumulates these on a separate encode-only pass over ≥ 100k train tokens
  (``sparsity.n_tokens_density``), not on the few thousand evaluation tokens.
- ``l0_train_mode`` / ``explained_variance_train_mode`` (calibrated sparsities only, e.g. BatchTopK): ``l0``
  and pooled ``explained_variance`` of the codes chosen by the training rule (batch top-k) on the same batches.
- CE: mean next-token cross-entropy (nats) over valid positions; KL(clean ‖ other) = Σ_v p_clean
  (log p_clean − log p_other), mean over valid positions. ``ce_loss_score`` = (CE_abl − CE_sae) /
  (CE_abl − CE_clean) and ``kl_div_score`` = (KL_abl − KL_sae) / KL_abl (SAEBench), with zero ablation;
  the ``*_mean_ablation`` variants use the mean-ablated run in place of the zero-ablated one. As in SAELens
  (sae-lens 6.54.12 ``get_recons_loss``: ``standard_zero_ablate_hook`` zeroes the whole activation, while
  ``standard_replacement_hook`` splices the SAE only where its ``mask`` is true) and SAEBench's core eval, the
  ablated runs replace the layer output at every position, BOS included (mean ablation: the train-split mean
  everywhere); only the SAE splice keeps special tokens clean; scored positions exclude special tokens.

An undefined value (nothing accumulated, or a zero denominator in a score) is ``None``, which JSON stores
as ``null``; ``aggregate_seeds`` skips it and reports how many seeds had a value.

    reconstruction.py  ReconstructionAccumulator, FeatureStatsAccumulator, log10_density_histogram
    logits.py          next_token_targets, CleanLogits, LogitAccumulator (CE and KL)
    results.py         core_results (the SAEBench-shaped dict), aggregate_seeds (mean ± se over seeds)
    persistence.py     PersistenceAccumulator: codes shared with the previous token, novel L0, by position
    split.py           ExcessCEAccumulator: the CE gap split by position and by token frequency
    common.py          flatten, token masks, guarded ratios
"""

from trsae.metrics.logits import CleanLogits, LogitAccumulator, next_token_targets
from trsae.metrics.persistence import PersistenceAccumulator
from trsae.metrics.reconstruction import FeatureStatsAccumulator, ReconstructionAccumulator, log10_density_histogram
from trsae.metrics.results import aggregate_seeds, core_results
from trsae.metrics.split import ExcessCEAccumulator, frequency_classes, token_classes

__all__ = [
    "ReconstructionAccumulator",
    "FeatureStatsAccumulator",
    "PersistenceAccumulator",
    "ExcessCEAccumulator",
    "frequency_classes",
    "token_classes",
    "CleanLogits",
    "LogitAccumulator",
    "log10_density_histogram",
    "next_token_targets",
    "core_results",
    "aggregate_seeds",
]
