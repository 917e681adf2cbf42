"""The field's temporal SAEs (T-SAE, TFA) and the TRSAE's selective temporal decoder: each against its defining
property, a naive reference or a closed form."""

import json
import math

import pytest
import torch
import torch.nn.functional as tnf

from trsae.evaluate import evaluate_sae
from trsae.saes import SAEConfig, make_sae
from trsae.saes.tfa import past_attention
from trsae.saes.tsae import contrastive_loss, token_pairs

D, F = 16, 64


def _batch(B=3, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 0] = False  # BOS
    return x, mask


# ------------------------------------------------------------------------------------------------ T-SAE


def naive_contrastive(h_BTH, mask_BT, tau):
    """Pair by pair, cosine logits: anchors h_t, positives h_{t-1}, negatives the positives of other sequences."""
    B, T, _ = h_BTH.shape
    pairs = [(b, t) for b in range(B) for t in range(1, T)
             if mask_BT[b, t] and mask_BT[b, t - 1] and h_BTH[b, t].abs().sum() > 0 and h_BTH[b, t - 1].abs().sum() > 0]
    unit = lambda v: v / v.norm()  # noqa: E731
    def direction(get):  # noqa: E306
        total = 0.0
        for b, t in pairs:
            a = unit(get(b, t, 0))
            pos = float(a @ unit(get(b, t, 1))) / tau
            negs = [float(a @ unit(get(b2, t2, 1))) / tau for b2, t2 in pairs if b2 != b]
            total += -pos + math.log(math.exp(pos) + sum(math.exp(n) for n in negs))
        return total / len(pairs)
    fwd = direction(lambda b, t, which: h_BTH[b, t - which])
    bwd = direction(lambda b, t, which: h_BTH[b, t - 1 + which])  # p as anchor, a as candidates
    return 0.5 * (fwd + bwd)


def _contrast(h_NH, mask_N, B, T, how="adjacent", **kw):
    return float(contrastive_loss(h_NH, *token_pairs(mask_N, B, T, how, torch.Generator().manual_seed(0)), **kw))


def test_contrastive_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 6, 5, generator=g).relu()
    h[1, 3] = 0  # a token with no high-level code: its two pairs drop out
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 0] = False
    mask[2, 4] = False
    got = _contrast(h.reshape(18, 5), mask.reshape(-1), 3, 6, logits="cosine", temperature=0.3)
    assert got == pytest.approx(naive_contrastive(h, mask, 0.3), rel=1e-5)


def test_contrastive_closed_form_for_constant_orthogonal_sequences():
    """Each sequence holds one constant code, codes of different sequences orthogonal: every anchor has its positive
    at cosine 1 and (B-1)(T-1) negatives at 0, so the loss is log(1 + (B-1)(T-1) e^{-1/tau})."""
    B, T, tau = 4, 7, 0.2
    h = torch.zeros(B, T, B)
    for b in range(B):
        h[b, :, b] = 1.0 + b
    ones = torch.ones(B * T, dtype=torch.bool)
    for how in ("adjacent", "random"):  # any earlier token of a constant sequence is the same positive
        got = _contrast(h.reshape(B * T, B), ones, B, T, how, logits="cosine", temperature=tau)
        assert got == pytest.approx(math.log(1 + (B - 1) * (T - 1) * math.exp(-1 / tau)), rel=1e-6)
    shuffled = h.reshape(B * T, B)[torch.randperm(B * T, generator=torch.Generator().manual_seed(0))]
    assert _contrast(shuffled, ones, B, T, logits="cosine", temperature=tau) > got + 1.0


def test_random_pairs_are_uniform_over_earlier_valid_tokens():
    """The reference's ``--temporal r``: each valid token's positive is drawn uniformly among the valid tokens before
    it in its sequence (counted over many draws against the exact 1 / (number of earlier valid tokens))."""
    B, T = 2, 7
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 0] = False  # BOS
    mask[1, 3] = False  # a special token mid-sequence is neither anchor nor positive
    gen = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, int], int] = {}
    draws = 4000
    for _ in range(draws):
        anchors, positives, seq = token_pairs(mask.reshape(-1), B, T, "random", gen)
        for a, p, b in zip(anchors.tolist(), positives.tolist(), seq.tolist()):
            assert a // T == p // T == b and p < a and mask.reshape(-1)[p]
            counts[(a, p)] = counts.get((a, p), 0) + 1
    for a in range(B * T):
        earlier = [p for p in range(a - a % T, a) if mask.reshape(-1)[p]]
        if not mask.reshape(-1)[a] or not earlier:
            assert not any(key[0] == a for key in counts)
            continue
        for p in earlier:
            assert counts[(a, p)] / draws == pytest.approx(1 / len(earlier), abs=0.03)


def test_pairs_take_positives_from_the_margin_but_never_anchors():
    """With a crop's left margin (context tokens that are not trained on), anchors are trained tokens only and
    positives may be margin tokens."""
    B, T, margin = 3, 8, 3
    ctx = torch.ones(B, T, dtype=torch.bool)
    ctx[:, 0] = False
    mask = ctx.clone()
    mask[:, :margin] = False
    seen_margin = False
    for how in ("random", "adjacent"):
        for seed in range(20):
            a, p, _ = token_pairs(mask.reshape(-1), B, T, how, torch.Generator().manual_seed(seed), ctx.reshape(-1))
            assert mask.reshape(-1)[a].all() and ctx.reshape(-1)[p].all() and (p < a).all()
            seen_margin |= bool((~mask.reshape(-1)[p]).any())
        assert a.numel() == B * (T - margin)  # every trained token has an earlier context token
    assert seen_margin


def test_tsae_loss_is_the_reference_objective_in_this_projects_units():
    """T-SAE's loss against a transcription of the authors' ``TemporalMatryoshkaBatchTopKTrainer.loss``
    (AI4LIFE-GROUP/temporal-saes @ 8daecb2) on raw activations: 1/2 [0.2 E||x - x_hat_inner||^2 + 0.8 E||x - x_hat||^2]
    + 0.1 x symmetric cross-entropy of raw dot products of the high-level codes over the pairs (token, earlier token).
    Ours works on s x with a per-dimension MSE at weight 1, so ours = reference x s^2 / (0.4 d). Two-token sequences
    make every pair's negatives other sequences, as in the reference's shuffled buffer."""
    B, T, s = 12, 2, 0.37
    cfg = SAEConfig.build(D, F, "matryoshka", "tsae", k=6, prefix_fracs=[0.25], level_weights=[0.25],
                          high_frac=0.25, input_scale=s)
    sae = make_sae(cfg).double().train()
    with torch.no_grad():
        sae.encoder.b_enc.normal_(0, 0.2, generator=torch.Generator().manual_seed(4))
        sae.b_dec.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    x_raw = torch.randn(B, T, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 3.0
    with torch.no_grad():
        out = sae(x_raw * s)
    ours = float(out.losses["mse"] + out.losses["inner_16"] + out.losses["contrast"])
    f_raw = out.codes_BTF.detach().reshape(B * T, F) / s  # the SAE of raw activations: b_dec / s, codes / s
    W, b_raw, H = sae.W_dec.detach(), sae.b_dec.detach() / s, 16
    x = x_raw.reshape(B * T, D)
    inner = ((x - (f_raw[:, :H] @ W[:H] + b_raw)) ** 2).sum(1).mean()
    outer = ((x - (f_raw @ W + b_raw)) ** 2).sum(1).mean()
    h_now, h_then = f_raw[1::2, :H], f_raw[0::2, :H]  # each sequence's one pair: (token 1, token 0)
    logits = h_now @ h_then.T
    labels = torch.arange(B)
    contrast = (tnf.cross_entropy(logits, labels) + tnf.cross_entropy(logits.T, labels)) / 2
    reference = 0.5 * (0.2 * inner + 0.8 * outer) + 0.1 * contrast
    assert float(contrast) > 0.1  # the term is not negligible in this case
    assert ours == pytest.approx(float(reference) * s * s / (0.4 * D), rel=1e-9)


def test_tsae_contrast_reaches_only_high_level_latents():
    cfg = SAEConfig.build(D, F, "matryoshka", "tsae", k=8, prefix_fracs=[0.25], high_frac=0.25, contrast_coeff=1.0)
    sae = make_sae(cfg).train()
    x, mask = _batch()
    out = sae(x, mask_BT=mask)
    assert float(out.losses["contrast"].detach()) > 0
    out.losses["contrast"].backward()
    H = cfg.encoder.n_high(F)
    assert H == 16
    assert sae.W_enc.grad[:, :H].abs().sum() > 0
    assert torch.equal(sae.W_enc.grad[:, H:], torch.zeros_like(sae.W_enc.grad[:, H:]))


def test_tsae_inference_is_per_token():
    """The loss shapes training only: a T-SAE encodes like its per-token twin with the same weights."""
    tsae = make_sae(SAEConfig.build(D, F, "topk", "tsae", k=8)).eval()
    twin = make_sae(SAEConfig.build(D, F, "topk", k=8)).eval()
    twin.load_state_dict(tsae.state_dict())
    x, mask = _batch()
    assert torch.equal(tsae.encode(x, mask_BT=mask), twin.encode(x, mask_BT=mask))


# ------------------------------------------------------------------------------------------------ TFA


def test_past_attention_matches_loop():
    g = torch.Generator().manual_seed(2)
    B, H, T, K, V = 2, 3, 6, 4, 5
    q, k, v = torch.randn(B, H, T, K, generator=g), torch.randn(B, H, T, K, generator=g), torch.randn(B, T, V, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 3] = False
    got = past_attention(q, k, v, mask)
    for b in range(B):
        for t in range(T):
            keys = [s for s in range(t) if mask[b, s]]
            if not keys:
                assert torch.equal(got[b, t], torch.zeros(V))
                continue
            ref = torch.zeros(V)
            for h in range(H):
                w = torch.softmax(torch.stack([q[b, h, t] @ k[b, h, s] / math.sqrt(K) for s in keys]), 0)
                ref += sum(wi * v[b, s] for wi, s in zip(w, keys)) / H
            torch.testing.assert_close(got[b, t], ref, rtol=1e-5, atol=1e-6)


def _prediction(sae, x, mask):
    st = sae.encoder.prepare(x, None, mask, sae.b_dec, sae.W_dec)
    return st.pred_NF.reshape(*x.shape[:2], -1), st


@pytest.mark.parametrize("encoder,kw", [("tfa", {}), ("tfa", {"pred_k": 4}), ("trsae", {"pred_k": 4, "window": 3})])
def test_prediction_uses_only_earlier_tokens(encoder, kw):
    sae = make_sae(SAEConfig.build(D, F, "topk", encoder, k=8, **kw)).eval()
    if encoder == "trsae":
        with torch.no_grad():
            sae.encoder.b_pred.fill_(0.5)  # predictions visibly non-zero at init
    x, mask = _batch()
    pred, _ = _prediction(sae, x, mask)
    assert torch.equal(pred[:, :2], torch.zeros_like(pred[:, :2]))  # t = 0 (BOS) and t = 1 (only BOS before it)
    assert pred[:, 2:].abs().sum() > 0
    t = 5
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    pred2, _ = _prediction(sae, x2, mask)
    assert torch.equal(pred2[:, : t + 1], pred[:, : t + 1])
    x3 = x.clone()
    x3[:, t - 1] += 3.0  # an earlier token moves the prediction at t
    pred3, _ = _prediction(sae, x3, mask)
    assert not torch.allclose(pred3[:, t], pred[:, t])


def test_tfa_prediction_is_the_projection_of_x():
    """The predicted reconstruction is the projection of x - b_dec onto W_dec^T p: the residual is orthogonal to it."""
    sae = make_sae(SAEConfig.build(D, F, "topk", "tfa", k=8))
    with torch.no_grad():
        sae.b_dec.normal_()
    x, mask = _batch()
    _, st = _prediction(sae, x, mask)
    rows = st.pred_ND.norm(dim=1) > 0
    resid = (st.x_ND - sae.b_dec - st.pred_ND)[rows]
    cos = (resid * st.pred_ND[rows]).sum(1) / (resid.norm(dim=1) * st.pred_ND[rows].norm(dim=1))
    assert cos.abs().max() < 1e-4
    torch.testing.assert_close(st.pred_ND, st.pred_NF @ sae.W_dec, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoder,kw,k,max_pred", [("tfa", {}, 8, F), ("tfa", {"pred_k": 3}, 5, 3),
                                                  ("trsae", {"pred_k": 3, "window": 3}, 5, 3)])
def test_reconstruction_decodes_predicted_plus_novel(encoder, kw, k, max_pred):
    sae = make_sae(SAEConfig.build(D, F, "topk", encoder, k=k, **kw))
    x, mask = _batch()
    out = sae(x, mask_BT=mask)
    out.loss.backward()
    assert all(p.grad is not None for p in sae.parameters())
    sae.eval()
    novel, pred = sae.encode_parts(x, mask_BT=mask)
    assert int((novel != 0).sum(-1).max()) <= k
    assert int((pred != 0).sum(-1).max()) <= max_pred
    codes = sae.encode(x, mask_BT=mask)
    torch.testing.assert_close(codes, novel + pred)
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(codes), sae(x, mask_BT=mask).x_hat_BTD, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae.reconstruct(x, mask_BT=mask), sae.decode(codes), rtol=1e-4, atol=1e-5)
    # the novel codes encode what the prediction leaves: the per-token term reads x - W_dec^T pred
    st = sae.encoder.prepare(x, None, mask, sae.b_dec, sae.W_dec)
    torch.testing.assert_close(st.enc_in_ND, x.reshape(-1, D) - pred.reshape(-1, F) @ sae.W_dec, rtol=1e-4, atol=1e-5)


def test_tfa_rescaling_the_dictionary_keeps_the_function():
    sae = make_sae(SAEConfig.build(D, F, "relu", "tfa"))
    x, mask = _batch()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(F, 1, generator=torch.Generator().manual_seed(3)) + 0.5)
        before = sae(x, mask_BT=mask).x_hat_BTD
        sae.normalize_decoder_()
        after = sae(x, mask_BT=mask).x_hat_BTD
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_trsae_without_pred_k_is_unchanged():
    """pred_k = 0 adds no parameter and predicts nothing."""
    a = make_sae(SAEConfig.build(D, F, "topk", "trsae", k=8, window=3))
    b = make_sae(SAEConfig.build(D, F, "topk", "trsae", k=8, window=3, pred_k=2))
    assert not a.predicts and b.predicts
    assert set(b.state_dict()) - set(a.state_dict()) == {"encoder.V_pred", "encoder.b_pred"}
    x, mask = _batch()
    st = a.encoder.prepare(x, None, mask, a.b_dec, a.W_dec)
    assert st.pred_NF is None and st.xin_ND is None


def test_bad_predictor_settings_are_named():
    with pytest.raises(ValueError, match="use_attn"):
        SAEConfig.build(D, F, "topk", "trsae", k=8, pred_k=2, use_attn=False)
    with pytest.raises(ValueError, match="pred_k"):
        SAEConfig.build(D, F, "topk", "tfa", k=8, pred_k=F + 1)
    with pytest.raises(ValueError, match="high_frac"):
        SAEConfig.build(D, F, "topk", "tsae", k=8, high_frac=0.0)


def test_evaluation_counts_predicted_codes_in_l0(tiny_store):
    d = tiny_store.d_model
    sae = make_sae(SAEConfig.build(d, 4 * d, "topk", "tfa", k=4, pred_k=2)).eval()
    r = evaluate_sae(sae, tiny_store, with_logits=False, max_seqs=4, density_tokens=64)["sparsity"]
    assert r["l0_novel"] == pytest.approx(4.0)
    assert 0 < r["l0_predicted"] <= 2
    # total L0 counts the union: at most novel + predicted, at least the novel codes
    assert r["l0_novel"] <= r["l0"] <= r["l0_novel"] + r["l0_predicted"] + 1e-9
    assert r["l0"] > r["l0_novel"]


def test_predicting_saes_are_not_exported_as_per_token_saes(tmp_path):
    from trsae.interchange import InterchangeError, export_saelens
    for encoder in ("tfa", "trsae"):
        kw = {"pred_k": 2} if encoder == "trsae" else {}
        with pytest.raises(InterchangeError, match="predicts part of its code"):
            export_saelens(make_sae(SAEConfig.build(D, F, "topk", encoder, k=8, **kw)), tmp_path / encoder,
                           per_token=True)
    cfg = export_saelens(make_sae(SAEConfig.build(D, F, "topk", "tsae", k=8)), tmp_path / "tsae") / "cfg.json"
    assert json.loads(cfg.read_text())["architecture"] == "topk"  # per-token at inference


def test_trsae_prediction_gradients_match_dense_autograd():
    """The predicted pairs go through the encoder's sparse backward; their gradients to V_pred, b_pred and the
    attention equal plain autograd on the dense prediction ``ReLU(ctx V^T + b)`` gathered at the same pairs."""
    sae = make_sae(SAEConfig.build(D, F, "topk", "trsae", k=5, window=3, pred_k=3))
    with torch.no_grad():
        sae.encoder.b_pred.normal_()  # non-zero: the bias gradient is checked too
    x, mask = _batch()
    enc = sae.encoder
    params = [enc.V_pred, enc.b_pred, *[p for n, p in enc.named_parameters() if n not in ("V_pred", "b_pred")]]
    st = enc.prepare(x, None, mask, sae.b_dec, sae.W_dec)
    w_NF = torch.randn(st.pred_NF.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((st.pred_NF * w_NF).sum(), params, allow_unused=True)
    st_ref = enc.prepare(x, None, mask, sae.b_dec, sae.W_dec)
    ctx_NC = st_ref.extra["ctx_NC"]
    sel_NF = st.pred_NF.detach() != 0
    has_N = (st.mask_N & (ctx_NC.detach().abs().sum(1) > 0))[:, None]
    ref_NF = torch.addmm(enc.b_pred, ctx_NC, enc.V_pred.T).relu() * sel_NF * has_N
    want = torch.autograd.grad((ref_NF * w_NF).sum(), params, allow_unused=True)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or g.abs().sum() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(pred_k=4), dict(per_token_gates=True)])
def test_trsae_trains_reproducibly_on_two_threads(kw):
    """The same seed gives the same weights bitwise at a size where CPU kernels run in parallel, for the selective
    decoder and the per-token gates (plain autograd gathers, ``V_pred[cols_M]`` and ``G[cols_M]``, backpropagated
    through index_put_'s parallel accumulation, in thread order: both failed 3 times out of 3)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no parallel accumulation to order")

    def train():
        torch.manual_seed(0)
        sae = make_sae(SAEConfig.build(128, 512, "topk", "trsae", k=16, window=4, **kw)).train()
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, mask = torch.randn(8, 64, 128, generator=g), torch.ones(8, 64, dtype=torch.bool)
            opt.zero_grad(set_to_none=True)
            sae(x, mask_BT=mask).loss.backward()
            opt.step()
        return [p.detach().clone() for p in sae.parameters()]

    a, b = train(), train()
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
