"""The amortisation ceiling's pursuit against closed forms and brute force, and `ceiling` against the evaluation."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from trsae.pursuit import ceiling, nn_omp


def _incoherent_dictionary(F, D, seed=0):
    W = torch.randn(F, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return W / W.norm(dim=1, keepdim=True)


def test_planted_sparse_signals_are_recovered_exactly():
    # 64 random unit atoms in 256 dimensions (mutual coherence ~0.25) and 4 positive coefficients in [1, 2]:
    # the regime where OMP provably recovers the support (Tropp 2004: k < (1 + 1/mu) / 2 ~ 2.5 at worst, and
    # random supports recover far beyond it), so codes and reconstructions must be exact
    F, D, k, N = 64, 256, 4, 50
    W = _incoherent_dictionary(F, D)
    gen = torch.Generator().manual_seed(1)
    true = torch.zeros(N, F, dtype=torch.float64)
    for i in range(N):
        idx = torch.randperm(F, generator=gen)[:k]
        true[i, idx] = 1 + torch.rand(k, generator=gen, dtype=torch.float64)
    codes = nn_omp(true @ W, W, k)
    assert torch.equal(codes != 0, true != 0)
    torch.testing.assert_close(codes, true, atol=1e-9, rtol=0)


def test_orthonormal_dictionary_gives_the_top_k_positive_coordinates():
    # with W = I the best non-negative k-sparse code keeps the k largest positive coordinates (closed form)
    D, k = 16, 3
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    codes = nn_omp(x, torch.eye(D, dtype=torch.float64), k)
    expect = torch.zeros_like(x)
    for i in range(len(x)):
        pos = torch.clamp(x[i], min=0)
        top = torch.topk(pos, k).indices
        expect[i, top] = pos[top]
    torch.testing.assert_close(codes, expect, atol=1e-12, rtol=0)


def test_codes_are_non_negative_k_sparse_and_refit_exactly():
    # a coherent dictionary (12 atoms in 4 dimensions, k = 4), where an unconstrained refit would go negative
    F, D, k = 12, 4, 4
    W = _incoherent_dictionary(F, D, seed=3)
    x = torch.randn(60, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    codes = nn_omp(x, W, k, chunk=7)  # chunks must not change anything
    torch.testing.assert_close(codes, nn_omp(x, W, k))
    assert (codes >= 0).all() and ((codes != 0).sum(1) <= k).all()
    for i in range(len(x)):  # the coefficients are the exact NNLS solution on their own support
        s = torch.nonzero(codes[i]).squeeze(1).numpy()
        coef, _ = nnls(W[s].numpy().T, x[i].numpy())
        np.testing.assert_allclose(codes[i, s].numpy(), coef, atol=1e-10)


def test_pursuit_is_never_better_than_brute_force_and_often_matches_it():
    # tiny problems: the best non-negative k-sparse code over every support is the true optimum
    F, D, k = 8, 5, 2
    W = _incoherent_dictionary(F, D, seed=5)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    codes = nn_omp(x, W, k)
    ties = 0
    for i in range(len(x)):
        best = min(nnls(W[list(s)].numpy().T, x[i].numpy())[1] for s in itertools.combinations(range(F), k))
        got = float((x[i] - codes[i] @ W).norm())
        assert got >= best - 1e-10
        ties += got <= best + 1e-10
    assert ties >= len(x) // 2


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
def test_ceiling_measures_the_encoder_on_the_evaluations_tokens(tiny_store, sparsity, tmp_path):
    from trsae.config import TrainConfig
    from trsae.evaluate import evaluate_sae
    from trsae.saes import SAEConfig
    from trsae.train import train_sae

    cfg = SAEConfig.build(tiny_store.d_model, 4 * tiny_store.d_model, sparsity, k=4)
    sae = train_sae(cfg, TrainConfig(tokens=2_000, batch_size=4, crop_len=16), tiny_store, tmp_path / "run",
                    progress=False)
    c = ceiling(sae, tiny_store, max_seqs=4)
    ev = evaluate_sae(sae, tiny_store, with_logits=False, max_seqs=4, density_tokens=100)
    # the encoder half is the evaluation's own FVU and L0 on the same tokens
    assert c["fvu_encoder"] == pytest.approx(1 - ev["reconstruction_quality"]["explained_variance"], abs=1e-9)
    assert c["l0_encoder"] == pytest.approx(ev["sparsity"]["l0"], abs=1e-9)
    assert c["n_tokens"] == ev["token_stats"]["n_tokens_eval"]
    assert c["l0_pursuit"] <= 4 and 0 < c["fvu_pursuit"] < 1


def test_ceiling_of_a_relu_sae_asks_for_k(tiny_store):
    """ReLU + L1 has no k: the ceiling says so (and what to pass) instead of an AttributeError from the config."""
    from trsae.pursuit import ceiling
    from trsae.saes import SAEConfig, make_sae

    sae = make_sae(SAEConfig.build(tiny_store.d_model, 32, "relu"))
    with pytest.raises(ValueError, match="has no k: pass the L0"):
        ceiling(sae, tiny_store, max_seqs=1)
