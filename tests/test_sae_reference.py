"""The JumpReLU and Matryoshka BatchTopK parts against SAELens's own implementations (sae-lens 6.54.12, the optional
extra): the straight-through functions' values and gradients, JumpReLU's first-batch thresholds and its dead-latent
pre-activation loss, and the Matryoshka training losses on equal weights and inputs."""

import os

import pytest
import torch

from trsae.saes import SAEConfig, make_sae
from trsae.saes.jumprelu import JumpReLUFn, StepFn

if os.environ.get("CI"):  # CI installs the extra: a missing package there is a failure, not a skip
    import sae_lens  # noqa: F401
else:
    pytest.importorskip("sae_lens", reason="the optional extra: pip install -e '.[saelens]'")

D, F, K = 16, 64, 4


def _z_theta(seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(50, F, generator=gen, dtype=torch.float64) * 0.3
    theta = torch.rand(F, generator=gen, dtype=torch.float64) * 0.3
    z[:, :8] = theta[:8] + 0.01  # some pre-activations inside the kernel's window around theta
    return z, theta


@pytest.mark.parametrize("fn", ["jumprelu", "step"])
def test_straight_through_functions_match_saelens(fn):
    from sae_lens.saes.jumprelu_sae import JumpReLU as TheirJumpReLU
    from sae_lens.saes.jumprelu_sae import Step as TheirStep

    z, theta = _z_theta()
    g = torch.randn_like(z)
    grads = []
    for impl in ("ours", "theirs"):
        z_, t_ = z.clone().requires_grad_(), theta.clone().requires_grad_()
        if impl == "ours":
            out = (JumpReLUFn if fn == "jumprelu" else StepFn).apply(z_, t_, 0.05)
        else:
            out = (TheirJumpReLU if fn == "jumprelu" else TheirStep).apply(z_, t_, 0.05, False)
        (out * g).sum().backward()
        grads.append((out.detach(), z_.grad, t_.grad))
    (o1, gz1, gt1), (o2, gz2, gt2) = grads
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(gt1, gt2)
    assert gt1.abs().sum() > 0
    if fn == "jumprelu":
        torch.testing.assert_close(gz1, gz2)
    else:  # the step reaches the threshold only (DeepMind's estimator, jumprelu_ste_to_input=False)
        assert gz1 is None and (gz2 is None or not gz2.any())


def _x(n=40, seed=1):
    return torch.randn(1, n, D, generator=torch.Generator().manual_seed(seed))


def test_jumprelu_starts_at_mean_l0_k_and_its_l0_loss_is_saelens_quadratic():
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    ours = make_sae(SAEConfig.build(D, F, "jumprelu", k=K, init="pooled", penalty="token")).train()
    x = _x()
    out = ours(x)
    assert (out.codes_BTF > 0).sum(-1).float().mean() == K  # first batch: threshold at the (K N)-th value
    theirs = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D, d_sae=F, jumprelu_sparsity_loss_mode="quadratic",
                                                           target_l0=K, jumprelu_bandwidth=0.05))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(theirs, name).copy_(getattr(ours, name))
        theirs.threshold.copy_(ours.sparsity.threshold)
        x2 = _x(seed=2)
        mine = ours(x2)
    step = TrainStepInput(sae_in=x2[0], coefficients={"l0": 1.0}, dead_neuron_mask=None, n_training_steps=0,
                          is_logging_step=False)
    res = theirs.training_forward_pass(step)
    torch.testing.assert_close(mine.codes_BTF[0], res.feature_acts)
    # SAELens sums the squared error over dimensions, this project averages: both terms carry a factor D
    torch.testing.assert_close(mine.losses["mse"] * D, res.losses["mse_loss"])
    torch.testing.assert_close(mine.losses["l0"] * D, res.losses["l0_loss"])


def test_jumprelu_per_latent_start_fires_every_latent_on_its_share():
    """Each latent's first threshold is its own (n+1)-th largest pre-activation, n = round(k V / F): on the first
    batch every latent fires on exactly n tokens (distinct random values), whatever its scale."""
    V = 200
    ours = make_sae(SAEConfig.build(D, F, "jumprelu", k=K)).train()
    with torch.no_grad():
        ours.W_enc.mul_(torch.linspace(0.1, 3.0, F))  # latents of very different scales
        ours.encoder.b_enc.copy_(torch.linspace(-2.0, 0.5, F))
    x = _x(n=V)
    out = ours(x)
    n = round(K * V / F)
    z = ours.pre_acts(x)[0].detach()
    for f in range(F):  # the naive way: sort each latent's values
        top = torch.sort(z[:, f], descending=True).values
        assert float(ours.sparsity.threshold[f].detach()) == pytest.approx(max(float(top[n]), 0.0))
    fires_F = (out.codes_BTF[0] > 0).sum(0)
    above = ours.sparsity.threshold > 0  # a latent whose (n+1)-th value is negative starts at 0: all its positives
    assert (fires_F[above] == n).all() and torch.equal(fires_F[~above], (z[:, ~above] > 0).sum(0))
    assert above.sum() > F // 2
    pooled = make_sae(SAEConfig.build(D, F, "jumprelu", k=K, init="pooled")).train()
    with torch.no_grad():
        for a, b in zip(pooled.parameters(), ours.parameters()):
            a.copy_(b)
        pooled.sparsity.threshold.fill_(-1.0)
    assert ((pooled(x).codes_BTF[0] > 0).sum(0) == 0).sum() > 0  # the pooled start leaves latents silent


def test_jumprelu_pre_act_loss_is_saelens():
    from sae_lens.saes.jumprelu_sae import calculate_pre_act_loss

    coeff = 0.3
    ours = make_sae(SAEConfig.build(D, F, "jumprelu", k=K, pre_act_coeff=coeff)).train()
    with torch.no_grad():
        ours.sparsity.threshold.copy_(torch.rand(F, generator=torch.Generator().manual_seed(3)))
        ours.W_dec.mul_(torch.linspace(0.5, 2.0, F)[:, None])  # the term weighs by decoder norms
    dead_F = torch.zeros(F, dtype=torch.bool)
    dead_F[::3] = True
    x = _x()
    mine = ours(x, dead_F=dead_F)
    z = ours.pre_acts(x)[0]
    theirs = calculate_pre_act_loss(coeff, ours.sparsity.threshold, z, dead_F, ours.W_dec.norm(dim=1))
    torch.testing.assert_close(mine.losses["pre_act"], theirs)
    assert float(theirs) > 0
    mine.losses["pre_act"].backward()
    assert ours.W_enc.grad[:, ~dead_F].abs().sum() == 0  # only the dead latents' encoder rows move
    assert ours.W_enc.grad[:, dead_F].abs().sum() > 0
    assert float(ours(x).losses["pre_act"]) == 0  # no dead latents, no term


def test_matryoshka_losses_match_saelens():
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    ours = make_sae(SAEConfig.build(D, F, "matryoshka", k=K, prefix_fracs=[0.125, 0.5])).train()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    theirs = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D, d_sae=F, k=K, matryoshka_widths=[8, 32, F], aux_loss_coefficient=1 / 32,
        rescale_acts_by_decoder_norm=False))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(theirs, name).copy_(getattr(ours, name))
    x = _x()
    mine = ours(x)
    res = theirs.training_forward_pass(TrainStepInput(sae_in=x[0], coefficients={}, dead_neuron_mask=None,
                                                      n_training_steps=0, is_logging_step=False))
    torch.testing.assert_close(mine.codes_BTF[0], res.feature_acts)
    torch.testing.assert_close(mine.losses["mse"] * D, res.losses["mse_loss"])
    for w in (8, 32):
        torch.testing.assert_close(mine.losses[f"inner_{w}"] * D, res.losses[f"inner_mse_loss_{w}"])
