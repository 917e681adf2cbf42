"""The experiment designs: the parameter-matched TopK really holds the TRSAE's parameter count, each TRSAE is
paired with the per-token SAE of its own sparsity, and the ablation rows are distinct models."""

import pytest

from trsae import experiments
from trsae.saes import make_sae

D, F, K = 32, 128, 4


def test_param_matched_topk_has_the_trsae_parameter_count():
    specs = experiments.temporal_specs(D, F, K, window=4)
    n_tr = sum(p.numel() for p in make_sae(specs["TRSAE"]).parameters())
    wide = specs["TopK-wide"]
    n_wide = sum(p.numel() for p in make_sae(wide).parameters())
    assert wide.width > F and abs(n_wide - n_tr) <= 2 * D + 1  # within one latent (W_enc col, W_dec row, b_enc)
    assert wide.sparsity == specs["TopK"].sparsity and wide.encoder.name == "token"
