"""`evaluate_saes` without the model, on SAEs whose weights are set by hand: reconstruction metrics in model
units and over ordinary tokens only; dead / dense latents from a long pass over the train split; BatchTopK's
train-mode L0 and explained variance beside the inference ones."""

import pytest
import torch

from trsae.evaluate import evaluate_sae
from trsae.saes import SAEConfig, make_sae


def _identity_sae(d, shift_D=None):
    """ReLU SAE of width 2d with codes (relu(x + c), relu(-x - c)) and decoder (I; -I): x̂ = x + c exactly."""
    sae = make_sae(SAEConfig.build(d, 2 * d, "relu"))
    eye = torch.eye(d)
    c = torch.zeros(d) if shift_D is None else shift_D
    with torch.no_grad():
        sae.encoder.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.encoder.b_enc.copy_(torch.cat([c, -c]))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_dec.zero_()
    return sae.eval()


def test_reconstruction_is_scored_in_model_units(tiny_store):
    d, s = tiny_store.d_model, tiny_store.norm_scale
    assert abs(s - 1) > 0.1  # scaled and model units differ
    c = torch.full((d,), 0.5)  # error c in the SAE's (scaled) units, c / s in the model's
    r = evaluate_sae(_identity_sae(d, c), tiny_store, with_logits=False, max_seqs=4, density_tokens=64)
    q = r["reconstruction_quality"]
    assert q["sse_per_token"] == pytest.approx(float(c.pow(2).sum()) / s**2, rel=1e-5)
    assert q["mse"] == pytest.approx(float(c.pow(2).mean()) / s**2, rel=1e-5)


def test_reconstruction_excludes_special_tokens(tiny_store):
    """An SAE exact at ordinary tokens and wildly wrong at BOS / special tokens scores perfectly."""
    d = tiny_store.d_model
    sae = _identity_sae(d)
    exact = type(sae).encode

    def encode(x_BTD, pos_BT=None, mask_BT=None):
        codes = exact(sae, x_BTD, pos_BT, mask_BT)
        codes[..., :d] += 7.0 * (~mask_BT)[..., None]  # x̂ = x + 7 where not scored
        return codes
    sae.encode = encode
    b = next(tiny_store.batches("test", batch_size=4, shuffle=None, epochs=1, drop_last=False))
    assert (~b.mask_BT).any()  # there are special tokens to get wrong
    r = evaluate_sae(sae, tiny_store, with_logits=False, max_seqs=4, density_tokens=64)
    q = r["reconstruction_quality"]
    assert q["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert q["explained_variance_legacy"] == pytest.approx(1.0, abs=1e-9)
    assert q["mse"] == pytest.approx(0.0, abs=1e-12)
    assert q["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert r["shrinkage"]["l2_ratio"] == pytest.approx(1.0, abs=1e-6)


def _train_values(store, split, c):
    return torch.cat([b.acts_BTD[b.mask_BT][:, c]
                      for b in store.batches(split, batch_size=32, shuffle=None, epochs=1, drop_last=False)])


def test_dead_and_dense_latents_come_from_a_long_train_pass(tiny_store):
    """Latents: 0 fires on exactly one train token (the i-th in stream order) and on no test token, 1 never,
    2 and 3 always. A pass that reaches token i counts latent 0 alive; one that stops before it, or the test
    split alone, would count it dead."""
    d = tiny_store.d_model
    for c in range(d):  # a coordinate whose train maximum exceeds everything in the test split
        tr, te = _train_values(tiny_store, "train", c), _train_values(tiny_store, "test", c)
        top2 = tr.topk(2).values
        if top2[0] > max(top2[1], te.max()) + 1e-3:
            break
    else:
        pytest.skip("no coordinate with a unique train maximum")
    i = int(tr.argmax())
    thr = float(top2[0] + max(top2[1], te.max())) / 2
    sae = make_sae(SAEConfig.build(d, 4, "relu"))
    with torch.no_grad():
        sae.encoder.W_enc.zero_()
        sae.encoder.W_enc[c, 0] = 1.0
        sae.encoder.b_enc.copy_(torch.tensor([-thr, -1.0, 1.0, 1.0]))
        sae.b_dec.zero_()
    sae.eval()
    n_train = tr.numel()

    def sparsity(n):
        return evaluate_sae(sae, tiny_store, with_logits=False, max_seqs=4, density_tokens=n)["sparsity"]

    long = sparsity(i + 1)
    assert long["n_tokens_density"] == i + 1
    assert long["dead_frac"] == 0.25 and long["dense_frac"] == 0.5
    short = sparsity(i) if i > 0 else None
    if short is not None:
        assert short["n_tokens_density"] == i
        assert short["dead_frac"] == 0.5
    every = sparsity(10**9)  # more than the split holds: all of it, and the count recorded
    assert every["n_tokens_density"] == n_train
    assert every["dead_frac"] == 0.25


def test_batchtopk_train_mode_l0_is_k_and_leaves_the_threshold(tiny_store):
    d, k = tiny_store.d_model, 4
    torch.manual_seed(0)
    sae = make_sae(SAEConfig.build(d, 4 * d, "batchtopk", k=k, seed=0))
    with torch.no_grad():
        sae.encoder.b_enc.add_(100.0)  # every pre-activation positive: the batch top-k keeps k·n non-zeros
        sae.sparsity.threshold.fill_(100.0)  # an inference threshold that keeps a different number
    sae.eval()
    thr = sae.sparsity.threshold.clone()
    r = evaluate_sae(sae, tiny_store, with_logits=False, max_seqs=4, batch_size=2, density_tokens=64)
    assert torch.equal(sae.sparsity.threshold, thr) and not sae.training
    assert r["sparsity"]["l0_train_mode"] == pytest.approx(k, abs=1e-12)
    assert r["sparsity"]["l0"] != pytest.approx(k, abs=0.5)

    # explained_variance_train_mode: pooled EV of the batch top-k codes, computed here by hand
    xs, xhs = [], []
    for b in tiny_store.batches("test", batch_size=2, shuffle=None, epochs=1, drop_last=False):
        sae.train()
        with torch.no_grad():
            codes = sae.encode(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT)
            xhs.append(sae.decode(codes)[b.mask_BT].double())
        sae.eval()
        xs.append(b.acts_BTD[b.mask_BT].double())
    x, xh = torch.cat(xs), torch.cat(xhs)
    ev = 1 - float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert r["reconstruction_quality"]["explained_variance_train_mode"] == pytest.approx(ev, rel=1e-6, abs=1e-9)

    topk = evaluate_sae(make_sae(SAEConfig.build(d, 4 * d, "topk", k=k)), tiny_store, with_logits=False,
                        max_seqs=4, density_tokens=64)
    assert "l0_train_mode" not in topk["sparsity"]
    assert "explained_variance_train_mode" not in topk["reconstruction_quality"]
