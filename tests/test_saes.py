"""One interface, tested once for every SAE variant: every registered encoder on every registered sparsity (a part
registered tomorrow is tested here without a new line), plus the format-1 checkpoints written before the SAE was
composed of parts."""

from __future__ import annotations

import json
import pytest
import torch

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from trsae.saes import SAE, ForwardOutput, SAEConfig, TopKConfig, load_sae, make_sae
from trsae.saes.config import PartConfig, part_names, register_part
from trsae.saes.sparse_ops import LatentOrder, batch_topk_pairs, decode_pairs, latent_product
from trsae.saes.sparsity import ReLUL1

D, F, K, B, T = 16, 64, 4, 3, 8

VARIANTS = [s if e == "token" else f"{e}-{s}" for e in part_names("encoder") for s in part_names("sparsity")]
"""``<sparsity>`` for the per-token encoder, else ``<encoder>-<sparsity>``: from the registry."""
SPARSE_LOSS = {"relu": {"l1"}, "topk": {"aux"}, "batchtopk": {"aux"}, "jumprelu": {"l0", "pre_act"},
               "matryoshka": {"aux", "inner_4", "inner_8", "inner_16", "inner_32"}}
ENCODER_LOSS = {"token": set(), "trsae": {"pos_l1", "gate"}, "tsae": {"contrast"}, "tfa": set()}


def encoder_of(variant: str) -> str:
    return variant.split("-")[0] if "-" in variant else "token"


DENSE_VARIANTS = [v for v in VARIANTS if encoder_of(v) in ("token", "trsae")]
"""Variants the dense autograd reference below covers (T-SAE's contrastive term and TFA's prediction have their
own reference tests in tests/test_field_temporal.py)."""


def make_cfg(variant: str, **kw) -> SAEConfig:
    encoder = encoder_of(variant)
    if encoder == "trsae":
        kw.setdefault("window", 3)
        kw.setdefault("ctx_init", 0.5)
    if mechanism(variant) != "relu":
        kw.setdefault("k", K)
    if mechanism(variant) in ("relu", "jumprelu"):
        kw.pop("aux_k", None)  # TopK-style settings do not apply
    return SAEConfig.build(D, F, mechanism(variant), encoder, **kw)


def mechanism(variant: str) -> str:
    return variant.split("-")[-1]


def build(variant: str, **kw) -> SAE:
    """An SAE with non-trivial temporal parameters (P, G random) so every term is exercised."""
    sae = make_sae(make_cfg(variant, **kw))
    if sae.cfg.encoder.name == "trsae":
        enc = sae.encoder
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            enc.P.copy_(0.3 * torch.randn(enc.P.shape, generator=gen))
            if enc.cfg.per_token_gates:
                enc.G.copy_(torch.randn(enc.G.shape, generator=gen))
    if sae.cfg.sparsity.name == "jumprelu":  # thresholds set and spread, as after training
        with torch.no_grad():
            sae.sparsity.threshold.copy_(0.2 + 0.3 * torch.rand(F, generator=torch.Generator().manual_seed(2)))
    return sae


def batch(seed: int = 0, b: int = B, t: int = T):
    gen = torch.Generator().manual_seed(seed)
    x_BTD = torch.randn(b, t, D, generator=gen)
    mask_BT = torch.rand(b, t, generator=gen) > 0.25
    mask_BT[:, 0] = False  # BOS
    return x_BTD, mask_BT


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_loss_terms(variant):
    sae = build(variant)
    x_BTD, mask_BT = batch()
    out = sae(x_BTD, mask_BT)
    assert isinstance(out, ForwardOutput)
    assert out.x_hat_BTD.shape == (B, T, D) and out.codes_BTF.shape == (B, T, F)
    assert out.loss.shape == ()
    torch.testing.assert_close(out.loss, torch.stack(list(out.losses.values())).sum())
    expected = {"mse"} | SPARSE_LOSS[mechanism(variant)]
    expected |= ENCODER_LOSS[encoder_of(variant)]
    assert set(out.losses) == expected
    assert sae.encode(x_BTD, mask_BT=mask_BT).shape == (B, T, F)
    assert sae.decode(out.codes_BTF).shape == (B, T, D)
    assert sae.pre_acts(x_BTD).shape == (B, T, F)
    assert sae.W_enc.shape == (D, F) and sae.W_dec.shape == (F, D)
    assert sae.n_params() == sum(p.numel() for p in sae.parameters())
    # the forward's x_hat is the decoder applied to its codes, and mse follows its documented definition
    torch.testing.assert_close(out.x_hat_BTD, sae.decode(out.codes_BTF), rtol=1e-5, atol=1e-5)
    err_BT = (out.x_hat_BTD - x_BTD).pow(2).sum(-1) / D
    torch.testing.assert_close(out.losses["mse"], err_BT[mask_BT].mean())


@pytest.mark.parametrize("variant", ["topk", "trsae-topk"])
@pytest.mark.parametrize("training", [True, False])
def test_topk_l0_is_exactly_k(variant, training):
    sae = build(variant).train(training)
    x_BTD, mask_BT = batch()
    codes_BTF = sae(x_BTD, mask_BT).codes_BTF
    assert ((codes_BTF > 0).sum(-1) == K).all()
    # the active latents are the k largest pre-activations of each token
    top_BTK = sae.pre_acts(x_BTD, mask_BT=mask_BT).topk(K, dim=-1).indices
    assert torch.equal(top_BTK.sort(-1).values, (codes_BTF > 0).nonzero()[:, 2].view(B, T, K))


@pytest.mark.parametrize("variant", ["batchtopk", "trsae-batchtopk"])
def test_batchtopk_mean_l0_and_threshold(variant):
    sae = build(variant).train()
    thr = sae.sparsity.threshold
    x_BTD, mask_BT = batch(b=4, t=16)
    assert float(thr) < 0
    codes_BTF = sae(x_BTD, mask_BT).codes_BTF
    l0_BT = (codes_BTF > 0).sum(-1)
    assert l0_BT[mask_BT].float().mean() == K
    assert (l0_BT[~mask_BT] == 0).all()  # masked tokens take no part in the batch selection
    assert l0_BT[mask_BT].float().std() > 0  # per-token L0 varies
    # the threshold is the smallest active code of the first batch, then an EMA
    first = codes_BTF[codes_BTF > 0].min()
    torch.testing.assert_close(thr, first)
    codes2_BTF = sae(*batch(seed=1, b=4, t=16)).codes_BTF
    beta = sae.cfg.sparsity.threshold_beta
    torch.testing.assert_close(thr, beta * first + (1 - beta) * codes2_BTF[codes2_BTF > 0].min())
    # eval mode: a latent is active iff its pre-activation exceeds the threshold
    sae.eval()
    z_BTF = sae.pre_acts(x_BTD, mask_BT=mask_BT)
    codes_BTF = sae.encode(x_BTD, mask_BT=mask_BT)
    assert torch.equal(codes_BTF > 0, z_BTF > thr)
    torch.testing.assert_close(codes_BTF, z_BTF * (z_BTF > thr))


def _flat_topk_reference(z_NF, k, mask_N):
    masked = z_NF.masked_fill(~mask_N[:, None], float("-inf")).flatten()
    top = masked.topk(k * int(mask_N.sum())).indices
    return set(zip((top // z_NF.shape[1]).tolist(), (top % z_NF.shape[1]).tolist()))


@pytest.mark.parametrize("adversarial", [False, True])
def test_batch_topk_pairs_matches_flat_topk(adversarial):
    gen = torch.Generator().manual_seed(0)
    n, f, k = 300, 50, 3
    z_NF = torch.randn(n, f, generator=gen)
    mask_N = torch.rand(n, generator=gen) > 0.2
    if adversarial:  # huge values on the sampled rows push the estimated threshold up: exact fallback path
        z_NF[mask_N.nonzero().squeeze(1)[::2]] += 100.0
    rows_M, cols_M = batch_topk_pairs(z_NF, k, mask_N)
    assert set(zip(rows_M.tolist(), cols_M.tolist())) == _flat_topk_reference(z_NF, k, mask_N)
    assert (rows_M[1:] >= rows_M[:-1]).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_codes_nonnegative_and_pos_ignored_by_per_token_saes(variant):
    sae = build(variant).eval()
    x_BTD, mask_BT = batch()
    novel_BTF, _ = sae.encode_parts(x_BTD, mask_BT=mask_BT)  # TFA adds a signed prediction to these
    assert (novel_BTF >= 0).all() and (novel_BTF > 0).any()
    if encoder_of(variant) != "trsae":  # the only encoder that reads positions
        pos_BT = torch.arange(T).expand(B, T) + 1000
        assert torch.equal(sae.encode(x_BTD, mask_BT=mask_BT), sae.encode(x_BTD, pos_BT, mask_BT))


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(variant, tmp_path):
    sae = build(variant)
    x_BTD, mask_BT = batch()
    sae(x_BTD, mask_BT)  # batchtopk: sets the threshold
    if sae.cfg.encoder.name == "trsae":
        sae.encoder.set_window(2)
    sae.eval()
    sae.save(tmp_path / "sae")
    meta = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert meta["format"] == 2 and meta["config"]["sparsity"]["name"] == mechanism(variant)
    assert meta["config"]["encoder"]["name"] == sae.cfg.encoder.name
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["config.json", "sae.safetensors"]
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg == sae.cfg and not loaded.training
    for name, t in sae.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    codes_BTF = sae.encode(x_BTD, mask_BT=mask_BT)
    assert torch.equal(codes_BTF, loaded.encode(x_BTD, mask_BT=mask_BT))
    assert torch.equal(sae.decode(codes_BTF), loaded.decode(codes_BTF))


FIXTURE = Path(__file__).parent / "fixtures" / "sae_v1"


@pytest.mark.parametrize("name", ["relu", "topk", "batchtopk", "trsae", "trsae_relu_tokgates",
                                  "trsae_batchtopk_nopos"])
def test_format_1_checkpoints_load_to_the_same_codes(name):
    """SAEs saved by the code before the parts redesign (commit c0c296f, see fixtures/sae_v1/make_fixture.py)
    load and give the codes, reconstructions and training loss that code computed (to float rounding: the
    fixture's machine may pick other BLAS kernels than this one, so bitwise equality would test the CPU)."""
    def close(got, want):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    assert json.loads((FIXTURE / name / "config.json").read_text())["format"] == 1
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    x_BTD, mask_BT, pos_BT = expected["x_BTD"], expected["mask_BT"], expected["pos_BT"]
    sae = load_sae(FIXTURE / name)
    s = sae.cfg.input_scale
    with torch.no_grad():
        close(sae.encode(x_BTD * s, pos_BT, mask_BT), expected[f"{name}.codes"])
        close(sae.reconstruct(x_BTD, pos_BT, mask_BT), expected[f"{name}.recon"])
    loss = sae.train()(x_BTD * s, mask_BT=mask_BT, pos_BT=pos_BT).loss
    close(loss.detach().reshape(1), expected[f"{name}.train_loss"])


def test_unknown_format_is_refused_with_the_file(tmp_path):
    build("topk").save(tmp_path / "sae")
    meta = json.loads((tmp_path / "sae" / "config.json").read_text())
    (tmp_path / "sae" / "config.json").write_text(json.dumps(meta | {"format": 99}))
    with pytest.raises(ValueError, match="config.json: SAE format 99"):
        load_sae(tmp_path / "sae")


@dataclass
class _ShiftedReLUConfig(PartConfig):
    shift: float = 0.5


@register_part("sparsity", "test-shifted-relu", _ShiftedReLUConfig)
class _ShiftedReLU(ReLUL1):
    """A new sparsity in one class: ReLU(z - shift), L1 as ReLU's (the test's own part)."""

    def codes(self, enc, st, dead_F=None, update=False):
        return super().codes(enc, st)._replace(dense_NF=(enc.dense(st) - self.cfg.shift).relu())

    def activate(self, z_NF, mask_N):
        return (z_NF - self.cfg.shift).relu()

    def losses(self, st, codes, x_hat_ND, W_dec_FD, b_dec_D):
        return {}


def test_a_registered_part_needs_no_change_elsewhere(tmp_path):
    cfg = SAEConfig.build(D, F, "test-shifted-relu", "trsae", shift=0.25, window=2)
    sae = make_sae(cfg)
    x_BTD, mask_BT = batch()
    z_BTF = sae.pre_acts(x_BTD, mask_BT=mask_BT)
    torch.testing.assert_close(sae.encode(x_BTD, mask_BT=mask_BT), (z_BTF - 0.25).relu())
    assert set(sae(x_BTD, mask_BT).losses) == {"mse", "pos_l1", "gate"}
    sae.save(tmp_path / "s")
    assert load_sae(tmp_path / "s").cfg == cfg


def test_build_routes_settings_to_their_parts():
    cfg = SAEConfig.build(D, F, "topk", "trsae", k=3, window=5, seed=2)
    assert cfg.sparsity == TopKConfig(k=3, aux_k=D // 2) and cfg.encoder.window == 5 and cfg.seed == 2
    assert cfg.label == "trsae-topk" and SAEConfig.build(D, F, "relu").label == "relu"
    assert cfg.replace(k=5, use_pos=False).flat() == {**cfg.flat(), "k": 5, "use_pos": False}
    with pytest.raises(ValueError, match="'window' is not a setting of an SAE, of the 'topk' sparsity or of the "
                                         "'token' encoder"):
        SAEConfig.build(D, F, "topk", window=4)
    with pytest.raises(ValueError, match="unknown sparsity 'gated'"):
        SAEConfig.build(D, F, "gated")


@pytest.mark.parametrize("variant", VARIANTS)
def test_reconstruct_applies_and_undoes_input_scale(variant):
    scale = 0.01
    x_BTD, mask_BT = batch()
    sae_scaled = build(variant, input_scale=scale).eval()
    sae_unit = build(variant).eval()
    with torch.no_grad():  # a non-zero b_dec, which reconstruct must take back to raw units with the rest
        for sae in (sae_scaled, sae_unit):
            sae.b_dec.copy_(torch.linspace(-1, 1, D))
    x_raw_BTD = x_BTD / scale  # raw activations are large; s * raw has E||.||^2 ~ d
    got = sae_scaled.reconstruct(x_raw_BTD, mask_BT=mask_BT)
    expected = sae_unit.decode(sae_unit.encode(x_BTD, mask_BT=mask_BT)) / scale
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("sparsity,bad", [
    ("gated", {}), ("topk", dict(width=0)), ("topk", dict(d_in=-1)), ("topk", dict(k=0)), ("topk", dict(k=F + 1)),
    ("topk", dict(aux_k=F + 1)), ("topk", dict(input_scale=0.0)), ("relu", dict(l1_coeff=-1.0)),
    ("topk", dict(aux_coeff=float("nan"))), ("batchtopk", dict(threshold_beta=1.0)), ("topk", dict(width=3.5)),
])
def test_config_validation(sparsity, bad):
    kw = dict(d_in=D, width=F) | bad
    with pytest.raises(ValueError):
        SAEConfig.build(kw.pop("d_in"), kw.pop("width"), sparsity, **kw)


def test_config_defaults_and_dict_round_trip():
    relu = SAEConfig.build(640, 4096, "relu")
    assert relu.sparsity.l1_coeff == pytest.approx(5 / 640)
    assert SAEConfig.build(640, 4096, "topk").sparsity.aux_k == 320
    tr = SAEConfig.build(640, 4096, "batchtopk", "trsae")
    assert tr.encoder.pos_l1 == pytest.approx(0.001 / 640) and tr.encoder.gate_l1 == pytest.approx(0.001 / 640)
    for cfg in (relu, tr):
        assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        SAEConfig.from_dict(relu.to_dict() | {"bogus": 1})
    with pytest.raises(ValueError, match="has no field"):
        SAEConfig.from_dict(relu.to_dict() | {"sparsity": {"name": "relu", "k": 3}})


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_normalisation(variant):
    sae = build(variant).eval()
    x_BTD, mask_BT = batch()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(F, 1) + 0.5)
    before = sae(x_BTD, mask_BT)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    if mechanism(variant) in ("relu", "jumprelu"):  # encoder and thresholds compensate: the same function
        after = sae(x_BTD, mask_BT)
        torch.testing.assert_close(after.x_hat_BTD, before.x_hat_BTD, rtol=1e-5, atol=1e-5)
        if encoder_of(variant) != "tsae":  # T-SAE's contrast compares codes, whose per-latent scale changed
            torch.testing.assert_close(after.loss, before.loss, rtol=1e-5, atol=1e-6)
    sae.W_dec.grad = torch.randn(F, D)
    sae.remove_parallel_grad_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(F), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_aux_loss_only_with_dead_latents(variant):
    sae = build(variant)
    x_BTD, mask_BT = batch()
    if mechanism(variant) in ("relu", "jumprelu"):
        assert "aux" not in sae(x_BTD, mask_BT, dead_F=torch.ones(F, dtype=torch.bool)).losses
        return
    assert sae(x_BTD, mask_BT).losses["aux"] == 0
    assert sae(x_BTD, mask_BT, dead_F=torch.zeros(F, dtype=torch.bool)).losses["aux"] == 0
    dead_F = torch.zeros(F, dtype=torch.bool)
    dead_F[::4] = True
    out = sae(x_BTD, mask_BT, dead_F=dead_F)
    assert out.losses["aux"] > 0
    # the aux loss reaches dead latents that the main loss never selects
    sae.zero_grad()
    out.losses["aux"].backward()
    pred_NF = sae.encoder.prepare(x_BTD, None, mask_BT, sae.b_dec, sae.W_dec).pred_NF  # TFA's dense prediction
    novel_BTF = out.codes_BTF - (0 if pred_NF is None else pred_NF.reshape(out.codes_BTF.shape))
    unused_F = dead_F & (novel_BTF[mask_BT] == 0).all(0)
    assert unused_F.any() and (sae.W_enc.grad[:, unused_F].abs().sum(0) > 0).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_tokens_do_not_affect_loss(variant):
    sae = build(variant)
    x_BTD, mask_BT = batch()
    dead_F = torch.zeros(F, dtype=torch.bool)
    dead_F[::4] = True
    out = sae(x_BTD, mask_BT, dead_F=dead_F)
    x2_BTD = torch.where(mask_BT[..., None], x_BTD, 50 * torch.randn_like(x_BTD))
    out2 = sae(x2_BTD, mask_BT, dead_F=dead_F)
    for name in out.losses:
        torch.testing.assert_close(out2.losses[name], out.losses[name], rtol=1e-6, atol=1e-7)
    # and the codes of every valid token are unchanged (masked tokens are no context keys either)
    torch.testing.assert_close(out2.codes_BTF[mask_BT], out.codes_BTF[mask_BT], rtol=1e-6, atol=1e-6)


def _reference_loss(sae: SAE, x_BTD, mask_BT, dead_F):
    """Dense autograd reference: z for all latents, a mask of the selected ones, a dense decoder."""
    z_NF = sae.pre_acts(x_BTD, mask_BT=mask_BT).reshape(-1, F)
    x_ND, m_N = x_BTD.reshape(-1, D), mask_BT.reshape(-1)
    mech, sp = sae.cfg.sparsity.name, sae.cfg.sparsity
    if mech == "relu":
        codes_NF = z_NF.relu()
    elif mech == "jumprelu":  # straight-through gradients to theta written as surrogates c * theta, c detached
        theta_F, bw = sae.sparsity.threshold, sp.bandwidth
        near_NF = ((z_NF.detach() - theta_F.detach()).abs() < bw / 2).float()
        jump_NF = -(theta_F.detach() / bw) * near_NF * theta_F  # d/dtheta: -(theta / bw) rect
        step_NF = -(near_NF / bw) * theta_F  # d/dtheta: -(1 / bw) rect
        codes_NF = z_NF * (z_NF > theta_F).float() + jump_NF - jump_NF.detach()
        step_NF = (z_NF > theta_F).float() + step_NF - step_NF.detach()
    else:
        if mech == "topk":
            sel_NF = torch.zeros_like(z_NF, dtype=torch.bool).scatter_(1, z_NF.topk(K).indices, True)
        else:
            masked = z_NF.detach().masked_fill(~m_N[:, None], float("-inf")).flatten()
            sel_NF = torch.zeros(z_NF.numel(), dtype=torch.bool)
            sel_NF[masked.topk(K * int(m_N.sum())).indices] = True
            sel_NF = sel_NF.view_as(z_NF)
        codes_NF = torch.where(sel_NF, z_NF.relu(), torch.zeros_like(z_NF))
    x_hat_ND = codes_NF @ sae.W_dec + sae.b_dec
    loss = ((x_hat_ND - x_ND).pow(2).sum(1) / D)[m_N].mean()
    if mech == "relu":
        loss = loss + sp.l1_coeff * (codes_NF @ sae.W_dec.norm(dim=1))[m_N].mean()
    elif mech == "jumprelu":  # the L0 penalty, and SAELens's pre-activation loss on the dead latents
        if sp.penalty == "batch":  # dictionary_learning: the batch's mean L0 against k
            loss = loss + sp.l0_coeff * (step_NF.sum(1)[m_N].mean() / K - 1).pow(2)
        else:  # SAELens's "quadratic": each token's L0 against k
            loss = loss + sp.l0_coeff * (2 / K * (step_NF.sum(1) - K).pow(2))[m_N].mean()
        gap_NF = (sae.sparsity.threshold - z_NF).relu() * dead_F.float()
        loss = loss + sp.pre_act_coeff * (gap_NF @ sae.W_dec.norm(dim=1))[m_N].mean()
    else:
        e_VD = (x_ND - x_hat_ND).detach()[m_N]
        dead_G = dead_F.nonzero().squeeze(1)
        vals, idx = z_NF[m_N][:, dead_G].topk(min(sp.aux_k, len(dead_G)))
        e_hat_VD = torch.zeros(len(e_VD), F).scatter(1, dead_G[idx], vals.relu()) @ sae.W_dec
        scale = min(len(dead_G) / sp.aux_k, 1.0)
        loss = loss + sp.aux_coeff * scale * (e_hat_VD - e_VD).pow(2).sum() / e_VD.pow(2).sum()
    if mech == "matryoshka":  # each prefix of the dictionary reconstructs with the same codes
        for w in (4, 8, 16, 32):
            inner_ND = codes_NF[:, :w] @ sae.W_dec[:w] + sae.b_dec
            loss = loss + ((inner_ND - x_ND).pow(2).sum(1) / D)[m_N].mean()
    if sae.cfg.encoder.name == "trsae":
        enc, c = sae.encoder, sae.cfg.encoder
        buckets_N = enc.buckets(torch.arange(T).expand(B, T)).reshape(-1)
        dec_norm_F = sae.W_dec.norm(dim=1)
        loss = loss + c.pos_l1 * (enc.P.abs()[:, buckets_N[m_N]] * dec_norm_F[:, None]).sum(0).mean()
        if c.per_token_gates:
            q_NK = (x_ND @ enc.W_qkv)[:, : c.d_k]
            gbar_F = torch.sigmoid(enc.gate_logit + q_NK @ enc.G.T)[m_N].mean(0)
        else:
            gbar_F = torch.sigmoid(enc.gate_logit)
        loss = loss + c.gate_l1 * (gbar_F * enc.U.norm(dim=1) * dec_norm_F).sum()
    return loss


@pytest.mark.parametrize("variant,kw", [(v, {}) for v in DENSE_VARIANTS]
                         + [("jumprelu", dict(penalty="token")), ("trsae-topk", dict(per_token_gates=True)),
                            ("trsae-batchtopk", dict(per_token_gates=True, d_v=8, d_ctx=6))])
def test_sparse_training_path_matches_dense_autograd(variant, kw):
    """The sparse forward/backward (pair gathers, embedding-bag decoder, sparse weight gradients) gives
    the loss and the gradients of autograd through the dense computation."""
    sae = build(variant, aux_k=6, **kw).train()
    x_BTD, mask_BT = batch()
    dead_F = torch.zeros(F, dtype=torch.bool)
    dead_F[::3] = True
    out = sae(x_BTD, mask_BT, dead_F=dead_F)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    ref = _reference_loss(sae, x_BTD, mask_BT, dead_F)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_latent_sums_equal_the_sparse_product(dtype):
    """`LatentOrder.sums` (the weight gradients of the pair path) is ``G @ table`` for the COO matrix of the pairs:
    equal to a dense product and to `torch.sparse.mm` (which it replaces), with pairs that repeat and two row-sorted
    runs (a TopK's pairs, then its AuxK pairs)."""
    gen = torch.Generator().manual_seed(3)
    n, f, a = 40, 64, 24
    rows_M = torch.cat([torch.arange(n).repeat_interleave(4), torch.arange(n).repeat_interleave(7)])
    cols_M = torch.randint(0, f, (rows_M.numel(),), generator=gen)
    cols_M[n * 4] = cols_M[0]  # the first token's first TopK pair again among its AuxK pairs
    w_M = torch.randn(rows_M.numel(), generator=gen, dtype=dtype)
    table_NA = torch.randn(n, a, generator=gen, dtype=dtype)
    got = LatentOrder(rows_M, cols_M, w_M, f).sums(table_NA)
    dense_FN = torch.zeros(f, n, dtype=dtype).index_put_((cols_M, rows_M), w_M, accumulate=True)
    torch.testing.assert_close(got, dense_FN @ table_NA)
    sparse_FN = torch.sparse_coo_tensor(torch.stack([cols_M, rows_M]), w_M, (f, n), check_invariants=False)
    torch.testing.assert_close(got, torch.sparse.mm(sparse_FN, table_NA))


def test_latent_product_uses_the_bags_in_float32_only():
    rows_M, cols_M = torch.tensor([0, 0, 1]), torch.tensor([2, 0, 2])
    assert isinstance(latent_product(rows_M, cols_M, torch.ones(3), 4), LatentOrder)
    table = torch.randn(2, 3, dtype=torch.float64)
    got = latent_product(rows_M, cols_M, torch.ones(3, dtype=torch.float64), 4).sums(table)
    torch.testing.assert_close(got, torch.stack([table[0], torch.zeros(3, dtype=torch.float64), table[0] + table[1],
                                                 torch.zeros(3, dtype=torch.float64)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_decode_gradients_equal_embedding_bags(dtype):
    """`decode_pairs` under autograd (its own decoder-weight backward in float32) gives `embedding_bag`'s output and
    gradients, with repeated pairs and rows that decode nothing."""
    gen = torch.Generator().manual_seed(5)
    n, f, d = 30, 50, 12
    rows_M = torch.arange(n).repeat_interleave(6)[6:]  # row 0 decodes nothing
    cols_M = torch.randint(0, f, (rows_M.numel(),), generator=gen)
    cols_M[7] = cols_M[6]  # a latent twice in one row
    W = torch.randn(f, d, generator=gen, dtype=dtype, requires_grad=True)
    vals = torch.rand(rows_M.numel(), generator=gen, dtype=dtype, requires_grad=True)
    g_ND = torch.randn(n, d, generator=gen, dtype=dtype)
    out = decode_pairs(rows_M, cols_M, vals, W, n)
    got = torch.autograd.grad(out, (vals, W), g_ND)
    counts = torch.bincount(rows_M, minlength=n)
    ref_out = torch.nn.functional.embedding_bag(cols_M, W, counts.cumsum(0) - counts, mode="sum",
                                                per_sample_weights=vals)
    ref = torch.autograd.grad(ref_out, (vals, W), g_ND)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def _sparse_data(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    atoms_GD = torch.randn(48, D, generator=gen)
    atoms_GD /= atoms_GD.norm(dim=1, keepdim=True)
    coef_NG = torch.rand(n, 48, generator=gen) * (torch.rand(n, 48, generator=gen) < 3 / 48)
    x_ND = coef_NG @ atoms_GD
    return (x_ND * (D / x_ND.pow(2).sum(1).mean()).sqrt()).view(-1, T, D)


@pytest.mark.parametrize("variant", VARIANTS)
def test_adam_reduces_loss_on_sparse_data(variant):
    torch.manual_seed(0)
    sae = build(variant)
    x_BTD = _sparse_data(32 * T)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = sae(x_BTD)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        losses.append(out.losses["mse"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_jumprelu_batch_penalty_and_optimiser_are_dictionary_learnings():
    """The default JumpReLU loss against a transcription of dictionary_learning's ``JumpReluTrainer.loss`` (commit
    60ec6bf: squared error summed over dimensions, ``sparsity_penalty * ((mean L0 / target_l0) - 1) ** 2`` with the
    L0 a step of the codes), in its units: this project's terms carry a factor 1 / D; and Adam without momentum."""
    coeff = 0.7
    sae = build("jumprelu", l0_coeff=coeff / D).train()
    x_BTD, _ = batch()
    mask_BT = torch.ones(B, T, dtype=torch.bool)
    out = sae(x_BTD, mask_BT)
    with torch.no_grad():  # the reference's forward, written out
        x_ND = x_BTD.reshape(-1, D)
        pre_NF = x_ND @ sae.W_enc + sae.b_enc
        theta_F = sae.sparsity.threshold
        f_NF = pre_NF * (pre_NF > theta_F)
        recon_loss = (x_ND - (f_NF @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()
        l0 = (f_NF > theta_F).float().sum(-1).mean()
        sparsity_loss = coeff * ((l0 / K) - 1) ** 2
    assert float(l0) != K  # the penalty is not at its minimum here
    torch.testing.assert_close(out.losses["mse"] * D, recon_loss)
    torch.testing.assert_close(out.losses["l0"] * D, sparsity_loss)
    token = build("jumprelu", l0_coeff=coeff / D, penalty="token").train()
    token.load_state_dict(sae.state_dict())
    per_token = (2 / K * ((pre_NF > theta_F).float().sum(-1) - K).pow(2)).mean()  # SAELens's "quadratic"
    torch.testing.assert_close(token(x_BTD, mask_BT).losses["l0"] * D, coeff * per_token)
    assert all(g["betas"] == (0.0, 0.999) for g in sae.optim_groups(1e-3))
    assert all("betas" not in g for g in build("topk").optim_groups(1e-3))  # Adam's defaults elsewhere


def test_relu_decoder_rows_start_at_their_init_norm():
    """`ReLUConfig.init_norm` scales the decoder rows at initialisation and the encoder starts at their transpose
    (SAELens's ``decoder_init_norm``); the other sparsities start at unit rows."""
    small = make_sae(make_cfg("relu", init_norm=0.1))
    unit = make_sae(make_cfg("relu"))
    torch.testing.assert_close(small.W_dec.norm(dim=1), torch.full((F,), 0.1))
    torch.testing.assert_close(small.W_enc, small.W_dec.T)
    torch.testing.assert_close(small.W_dec * 10, unit.W_dec)  # the same directions, from the same seed
    torch.testing.assert_close(make_sae(make_cfg("topk")).W_dec.norm(dim=1), torch.ones(F))
    with pytest.raises(ValueError, match="init_norm"):
        make_cfg("relu", init_norm=0.0)
