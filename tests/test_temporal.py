"""TRSAE components: the O(T) windowed attention against a naive loop, exact reduction to the baselines,
causality, curriculum, position buckets, gradients, ablation switches, reporting, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from trsae.saes import SAE, SAEConfig, TRSAEEncoderConfig, load_sae, make_sae
from trsae.saes.context import (bucket_bounds, feature_map, naive_window_attention, position_buckets,
                                windowed_linear_attention)

D, F, K = 16, 64, 4


def trsae(sparsity: str = "topk", **kw) -> SAE:
    kw = dict(window=3, ctx_init=1.0, d_k=4, d_v=8, d_ctx=8) | kw
    if sparsity != "relu":
        kw.setdefault("k", K)
    sae = make_sae(SAEConfig.build(D, F, sparsity, "trsae", **kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if sae.cfg.encoder.use_pos:
            sae.encoder.P.copy_(0.3 * torch.randn(sae.encoder.P.shape, generator=gen))
    return sae


def qkv(b, t, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = feature_map(torch.randn(b, t, 4, generator=gen, dtype=dtype))
    k = feature_map(torch.randn(b, t, 4, generator=gen, dtype=dtype))
    v = torch.randn(b, t, 5, generator=gen, dtype=dtype)
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[:, 0] = False
    return q, k, v, mask


# ------------------------------------------------------------------------------------------ attention

GRID = [(w, t, b) for t in (1, 7, 32) for w in sorted({0, 1, 2, 5, t - 1, t, t + 3}) if w >= 0 for b in (1, 3)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("w,t,b", GRID)
def test_windowed_attention_matches_naive_loop(w, t, b, causal):
    q, k, v, mask = qkv(b, t, torch.float64, seed=w * 100 + t)
    for m in (None, mask):
        fast = windowed_linear_attention(q, k, v, w, m, causal=causal)
        slow = naive_window_attention(q, k, v, w, m, causal=causal)
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    # float32 (the training dtype) within float32 tolerance
    q32, k32, v32 = q.float(), k.float(), v.float()
    torch.testing.assert_close(windowed_linear_attention(q32, k32, v32, w, mask, causal),
                               naive_window_attention(q32, k32, v32, w, mask, causal), rtol=1e-4, atol=1e-5)


def test_windowed_attention_zero_context_and_gradients():
    q, k, v, mask = qkv(2, 9, torch.float64)
    out = windowed_linear_attention(q, k, v, 4, mask)
    assert (out[:, 0] == 0).all() and (out[:, 1] == 0).all()  # t = 0, and t = 1 whose only key is BOS
    assert (windowed_linear_attention(q, k, v, 0, mask) == 0).all()
    for t_ in (q, k, v):
        t_.requires_grad_(True)
    grads_fast = torch.autograd.grad(windowed_linear_attention(q, k, v, 4, mask).pow(2).sum(), (q, k, v))
    grads_slow = torch.autograd.grad(naive_window_attention(q, k, v, 4, mask).pow(2).sum(), (q, k, v))
    for a, b in zip(grads_fast, grads_slow):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ reduction

@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu"])
@pytest.mark.parametrize("how", ["w=0", "use_attn=False"])
def test_no_context_and_zero_P_is_exactly_the_baseline(sparsity, how):
    kw = {} if sparsity == "relu" else {"k": K}
    tr = make_sae(SAEConfig.build(D, F, sparsity, "trsae", window=5, use_attn=how == "w=0", **kw))
    if how == "w=0":
        tr.encoder.set_window(0)
    base = make_sae(SAEConfig.build(D, F, sparsity, **kw))
    shared = {n: t for n, t in tr.state_dict().items() if n in base.state_dict()}
    base.load_state_dict(shared)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, D, generator=gen)
    mask = torch.rand(3, 12, generator=gen) > 0.2
    out_tr, out_base = tr(x, mask), base(x, mask)
    assert torch.equal(out_tr.codes_BTF, out_base.codes_BTF)
    assert torch.equal(out_tr.x_hat_BTD, out_base.x_hat_BTD)
    assert torch.equal(out_tr.loss, out_base.loss)
    tr.eval(), base.eval()
    assert torch.equal(tr.encode(x, mask_BT=mask), base.encode(x, mask_BT=mask))


# ------------------------------------------------------------------------------------------ causality

def test_causal_codes_ignore_the_future_and_lookahead_does_not():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, D, generator=gen)
    s = 6
    x2 = x.clone()
    x2[:, s] += 3 * torch.randn(2, D, generator=gen)
    causal = trsae(window=4, ctx_init=3.0).eval()
    c1, c2 = causal.encode(x), causal.encode(x2)
    assert torch.equal(c1[:, :s], c2[:, :s])
    assert not torch.equal(c1[:, s + 1:], c2[:, s + 1:])  # later tokens do see x_s through the window
    ahead = trsae(window=4, ctx_init=3.0, causal=False).eval()
    a1, a2 = ahead.encode(x), ahead.encode(x2)
    assert not torch.equal(a1[:, s - 4:s], a2[:, s - 4:s])
    assert torch.equal(a1[:, : s - 4], a2[:, : s - 4])  # still windowed


# ------------------------------------------------------------------------------------------ schedule, buckets

def test_curriculum_and_window():
    sae = trsae(window=10, w_start=2, curriculum_frac=0.5).encoder
    assert sae.window == 10  # a fresh model evaluates with the full window
    got = [sae.window_at(step, 100) for step in (0, 1, 12, 25, 49, 50, 99, 1000)]
    assert got == [2, 2, 3, 6, 9, 10, 10, 10]
    assert trsae(window=10, w_start=2).encoder.window_at(0, 100) == 10  # curriculum_frac = 0: no curriculum
    sae.set_window(sae.window_at(25, 100))
    assert sae.window == 6
    with pytest.raises(ValueError):
        sae.set_window(-1)


def _bucket_reference(t, n_exact, n_buckets, pos_max):
    if t < n_exact:
        return t
    return min(n_buckets - 1, n_exact + int(math.floor((n_buckets - n_exact) * math.log(t / n_exact)
                                                        / math.log(pos_max / n_exact))))


def test_position_buckets():
    pos = torch.arange(3000)
    got = position_buckets(pos, 8, 32, 1024)
    assert got[:8].tolist() == list(range(8))
    # 8 + floor(24 log(t / 8) / log(128)): t = 15 -> 11.1, 64 -> 18.3, 128 -> 21.7, 836 -> 30.99, 837 -> 31.0
    at = (8, 9, 15, 16, 64, 128, 836, 837, 1024, 2999)
    assert [int(got[t]) for t in at] == [8, 8, 11, 11, 18, 21, 30, 31, 31, 31]
    assert got.tolist() == [_bucket_reference(t, 8, 32, 1024) for t in range(3000)]
    assert (got[1:] >= got[:-1]).all()
    assert position_buckets(pos, 4, 4, 100).max() == 3  # all-exact buckets: the last one is open-ended
    bounds = bucket_bounds(8, 32, 1024)
    assert bounds[0] == (0, 0) and bounds[8] == (8, 9) and bounds[31] == (837, -1)


# ------------------------------------------------------------------------------------------ gradients, losses

@pytest.mark.parametrize("per_token_gates", [False, True])
@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu"])
def test_gradients_reach_every_temporal_parameter(sparsity, per_token_gates):
    sae = trsae(sparsity=sparsity, per_token_gates=per_token_gates, d_v=8, d_ctx=6)
    sae.encoder.P.data.zero_()  # zero-initialised P must still get a gradient
    x = torch.randn(2, 9, D)
    sae(x).loss.backward()
    names = {"P", "W_qkv", "W_o", "U", "gate_logit"} | ({"G"} if per_token_gates else set())
    assert names <= {n for n, _ in sae.encoder.named_parameters()}
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_temporal_loss_terms_follow_their_definitions():
    sae = trsae(pos_l1=0.1, gate_l1=0.01, n_exact_pos=2, n_buckets=5, pos_max=8)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(F, 1) + 0.5)
    norm_F = sae.W_dec.norm(dim=1)
    x = torch.randn(2, 12, D)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 0] = False
    pos = torch.arange(12).expand(2, 12) + torch.tensor([[0], [7]])
    losses = sae(x, mask, pos).losses
    b = position_buckets(pos, 2, 5, 8)[mask]
    enc = sae.encoder
    torch.testing.assert_close(losses["pos_l1"], 0.1 * (enc.P.abs()[:, b] * norm_F[:, None]).sum(0).mean())
    gate_F = torch.sigmoid(enc.gate_logit)
    torch.testing.assert_close(losses["gate"], 0.01 * (gate_F * enc.U.norm(dim=1) * norm_F).sum())
    c = SAEConfig.build(D, F, "topk", "trsae").encoder
    assert c.pos_l1 == pytest.approx(0.001 / D) and c.gate_l1 == pytest.approx(0.001 / D)


# ------------------------------------------------------------------------------------------ ablations, reports

def test_ablation_switches():
    x = torch.randn(2, 9, D)
    shifted = torch.arange(9).expand(2, 9) + 40
    with_pos = trsae().eval()
    assert not torch.equal(with_pos.encode(x), with_pos.encode(x, shifted))
    no_pos = trsae(use_pos=False).eval()
    assert not hasattr(no_pos.encoder, "P") and no_pos.encoder.positional_features() == []
    assert torch.equal(no_pos.encode(x), no_pos.encode(x, shifted))
    assert "pos_l1" not in no_pos(x).losses
    no_gates = trsae(use_gates=False)
    assert not hasattr(no_gates.encoder, "gate_logit") and torch.equal(no_gates.encoder.gates(), torch.ones(F))
    assert "gate" not in no_gates(x).losses
    torch.testing.assert_close(no_gates.encoder.context_strength(), no_gates.encoder.U.norm(dim=1))
    no_attn = trsae(use_attn=False)
    assert not hasattr(no_attn.encoder, "U") and no_attn.encoder.open_gates(0.0) == 0
    # per-token gates with G = 0 are the per-feature gates
    per_feature, per_token = trsae().eval(), trsae(per_token_gates=True).eval()
    per_token.load_state_dict(per_feature.state_dict() | {"encoder.G": torch.zeros(F, 4)})
    torch.testing.assert_close(per_token.encode(x), per_feature.encode(x))


def test_reports_positional_features_and_open_gates():
    sae = trsae().encoder
    with torch.no_grad():
        sae.P.zero_()
        sae.P[3, 2] = 1.0
        sae.P[7, 5] = -2.0
        sae.P[7, 6] = 0.8
        sae.U.zero_()
        sae.U[[1, 4], 0] = 1.0
        sae.gate_logit.zero_()
        sae.W_enc.mul_(2.0 / sae.W_enc.norm(dim=0))  # token term of every feature: std 2
    # thresholds are relative to the token term: |P| / 2 and sigmoid(0) * ||U_f|| / 2 = 0.25
    assert sae.positional_features(0.25) == [(7, [5, 6]), (3, [2])]
    assert sae.positional_features(0.45) == [(7, [5]), (3, [2])]
    assert sae.positional_features(0.6) == [(7, [5])]
    assert sae.open_gates(0.2) == 2 and sae.open_gates(0.3) == 0


def test_config_validation():
    for bad in (dict(window=-1), dict(window=2, w_start=3), dict(curriculum_frac=1.5),
                dict(d_k=0), dict(n_exact_pos=40, n_buckets=32), dict(pos_max=8, n_exact_pos=8),
                dict(gate_l1=-1.0), dict(causal="yes"), dict(temporal_lr_mult=0.0)):
        with pytest.raises(ValueError):
            TRSAEEncoderConfig(**bad)
    cfg = SAEConfig.build(D, F, "topk", "trsae", k=K)
    assert cfg.label == "trsae-topk" and cfg.encoder == TRSAEEncoderConfig(pos_l1=0.001 / D, gate_l1=0.001 / D)
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


def test_save_load_round_trip(tmp_path):
    sae = trsae(per_token_gates=True, sparsity="batchtopk", d_v=8, d_ctx=6)
    with torch.no_grad():
        sae.encoder.G.normal_()
    x = torch.randn(2, 9, D)
    sae(x)
    sae.encoder.set_window(2)
    sae.eval().save(tmp_path / "m")
    loaded = load_sae(tmp_path / "m")
    assert loaded.cfg == sae.cfg and loaded.encoder.window == 2
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert loaded.n_params() == sae.n_params()


def test_cost_is_independent_of_the_window_in_memory_terms():
    """The attention never builds a [T, w] or [T, T] score tensor: its largest intermediate is the
    [B, T+1, d_k, d_v+1] prefix sum, whatever w is."""
    q, k, v, mask = qkv(1, 64, torch.float32)
    sizes = []
    for w in (1, 16, 63):
        seen = []
        with torch.profiler.profile(record_shapes=True) as prof:
            windowed_linear_attention(q, k, v, w, mask)
        for e in prof.events():
            for shape in e.input_shapes or []:
                if isinstance(shape, list) and shape and all(isinstance(s, int) for s in shape):
                    seen.append(math.prod(shape))
        sizes.append(max(seen))
    assert sizes[0] == sizes[1] == sizes[2] == 65 * 4 * 6
