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


def test_field_specs_hold_at_most_k_codes_where_it_is_matched():
    E = experiments
    specs = E.field_specs(64, 512, 32, window=4)
    assert set(specs) == set(E.FIELD)
    assert specs["T-SAE"].sparsity.name == "matryoshka" and specs["T-SAE"].sparsity.prefix_fracs == [0.2]
    assert specs["T-SAE"].encoder.high_frac == 0.2
    assert specs["TFA"].k == 32 and specs["TFA"].encoder.pred_k is None  # as published: dense prediction
    pred = specs["TRSAE-pred"]
    assert pred.encoder.pred_k + pred.k == 32 and pred.encoder.window == 4
    with pytest.raises(ValueError, match="pred_k"):
        E.field_specs(64, 512, 32, window=4, pred_k=32)


def test_ablation_specs_add_the_selective_decoder_only_when_asked():
    E = experiments
    plain = E.ablation_specs(64, 512, 32, 4, [0, 4])
    assert E.DECODER_VARIANT not in plain
    specs = E.ablation_specs(64, 512, 32, 4, [0, 4], pred_k=8)
    variant = specs[E.DECODER_VARIANT]
    assert variant.encoder.pred_k == 8 and variant.k == 24
    assert variant.replace(pred_k=0, k=32) == specs["full"]
