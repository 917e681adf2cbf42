import dataclasses

import pytest
import torch

from trsae.config import TrainConfig
from trsae.saes import SAEConfig, load_sae
from trsae.train import RunError, lr_lambda, read_log, train_sae

TCFG = TrainConfig(tokens=16 * 8 * 30, batch_size=8, crop_len=16, lr=1e-3, seed=0, checkpoint_every=7,
                   log_every=5, dead_window_frac=0.2)


def _cfg(store, arch="topk"):
    return SAEConfig.build(store.d_model, 96, arch, **({} if arch == "relu" else {"k": 4}))


def test_lr_schedule_values():
    # 100 steps: warm-up over 10, constant, linear decay over the last 20 to zero
    vals = [lr_lambda(s, 100, 0.1, 0.2) for s in range(100)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert vals[10:80] == [1.0] * 70
    assert vals[80] == pytest.approx(1.0) and vals[90] == pytest.approx(0.5) and vals[99] == pytest.approx(0.05)


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_training_reduces_loss_and_logs(tmp_path, tiny_store, arch):
    sae = train_sae(_cfg(tiny_store, arch), TCFG, tiny_store, tmp_path, progress=False)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    assert log[-1]["fvu"] < log[0]["fvu"]
    assert sae.cfg.input_scale == pytest.approx(tiny_store.norm_scale)
    again = load_sae(tmp_path / "sae")
    for k, v in sae.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, tiny_store, arch):
    full = train_sae(_cfg(tiny_store, arch), TCFG, tiny_store, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    for _ in range(3):  # three interruptions at steps 11, 22 (the last call finishes the run)
        train_sae(_cfg(tiny_store, arch), TCFG, tiny_store, part, progress=False, max_steps=11)
    resumed = load_sae(part / "sae")
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert read_log(part) == [dict(r, tok_per_s=r2["tok_per_s"]) for r, r2 in zip(read_log(tmp_path / "full"), read_log(part))]


def test_resume_refuses_another_config(tmp_path, tiny_store):
    train_sae(_cfg(tiny_store), TCFG, tiny_store, tmp_path, progress=False, max_steps=2)
    with pytest.raises(RunError, match="another sae configuration"):
        train_sae(_cfg(tiny_store).replace(k=5), TCFG, tiny_store, tmp_path, progress=False)
    with pytest.raises(RunError, match="another train configuration"):
        train_sae(_cfg(tiny_store), dataclasses.replace(TCFG, lr=2e-3), tiny_store, tmp_path, progress=False)


def test_store_width_mismatch_is_refused(tmp_path, tiny_store):
    with pytest.raises(RunError, match="d_in"):
        train_sae(SAEConfig.build(tiny_store.d_model + 1, 96, "topk", k=4), TCFG, tiny_store, tmp_path)


def test_auxk_revives_latents_that_cannot_fire(tmp_path, tiny_store, monkeypatch):
    """Eight latents start with an encoder 1000x too small to ever reach the top k. The trainer counts them dead
    after its window (in steps), logs it, and the AuxK loss gives them gradient until they fire; with the
    auxiliary loss switched off they never fire."""
    import trsae.train as T

    real = T.make_sae

    def crippled(cfg, dtype=torch.float32):
        sae = real(cfg, dtype)
        with torch.no_grad():
            sae.W_enc[:, :8] *= 1e-3
        return sae

    monkeypatch.setattr(T, "make_sae", crippled)
    cfg = TrainConfig(tokens=16 * 8 * 90, batch_size=8, crop_len=16, lr=3e-3, log_every=5, checkpoint_every=100,
                      dead_window_frac=0.05)
    fired = {}
    for name, aux_coeff in (("aux", 1 / 32), ("no-aux", 0.0)):
        sae = train_sae(_cfg(tiny_store).replace(aux_coeff=aux_coeff), cfg, tiny_store, tmp_path / name,
                        progress=False)
        log = read_log(tmp_path / name)
        assert log[0]["n_dead"] >= 8 and log[0]["dead_frac"] == pytest.approx(log[0]["n_dead"] / 96)  # after 4 steps
        assert (max(r["aux"] for r in log) > 0) == (aux_coeff > 0)
        counts_F = torch.zeros(96)
        for b in tiny_store.batches("train", batch_size=8, crop_len=16, shuffle=None, epochs=1):
            counts_F += (sae.encode(b.acts_BTD, mask_BT=b.mask_BT)[b.mask_BT] > 0).sum(0)
        fired[name] = int((counts_F[:8] > 0).sum())
    assert fired == {"aux": 8, "no-aux": 0}, fired


def test_batchtopk_threshold_gives_l0_k_on_training_data(tmp_path, tiny_store):
    """After training, per-token thresholding reproduces the batch top-k budget (mean L0 = k)."""
    sae = train_sae(_cfg(tiny_store, "batchtopk"), TCFG, tiny_store, tmp_path, progress=False)
    l0 = []
    for b in tiny_store.batches("train", batch_size=8, crop_len=16, seed=1, epochs=1):
        codes = sae.encode(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT)
        l0.append((codes[b.mask_BT] > 0).sum(-1).float())
    assert torch.cat(l0).mean().item() == pytest.approx(4, rel=0.1)


def test_the_margin_reaches_temporal_encoders_only(tiny_store, tmp_path):
    """A per-token SAE trained with a left margin trains exactly as without one (it never reads the margin); a
    TRSAE's pre-activations at a crop's tokens, with a margin as long as its window, equal those of the whole
    sequence at the same positions (its window is complete at the crop's first tokens)."""
    from trsae.saes import make_sae

    base = TrainConfig(tokens=8 * 16 * 4, batch_size=8, crop_len=16, lr=1e-3)
    cfg = _cfg(tiny_store)
    plain = train_sae(cfg, base, tiny_store, tmp_path / "plain", progress=False)
    margin = train_sae(cfg, dataclasses.replace(base, context=8), tiny_store, tmp_path / "margin", progress=False)
    for a, b in zip(plain.state_dict().values(), margin.state_dict().values()):
        assert torch.equal(a, b)

    w = 4
    tr = make_sae(SAEConfig.build(tiny_store.d_model, 64, "topk", "trsae", k=4, window=w, w_start=w)).eval()
    with torch.no_grad():
        tr.encoder.U.normal_(0, 0.5)  # the context visibly moves the pre-activations
    b = next(tiny_store.batches("train", batch_size=6, crop_len=16, context=w, seed=0))
    z_BTF = tr.pre_acts(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT, ctx_BT=b.ctx_BT).detach()
    no_ctx = tr.pre_acts(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT).detach()
    assert not torch.allclose(z_BTF[:, w], no_ctx[:, w])  # without the margin as context, a crop's start differs
    for i, seq in enumerate(b.seq_B):
        acts, ids = tiny_store.sequence(int(seq))
        whole_TF = tr.pre_acts((acts * tiny_store.norm_scale)[None].to(b.acts_BTD.dtype),
                               mask_BT=(ids != 50256)[None]).detach()[0]
        pos_T = b.pos_BT[i, w:]
        torch.testing.assert_close(z_BTF[i, w:], whole_TF[pos_T], rtol=1e-5, atol=1e-5)


def test_trsae_temporal_parameters_get_their_own_learning_rate():
    from trsae.saes import make_sae

    sae = make_sae(SAEConfig.build(8, 16, "topk", "trsae", k=2, window=2, temporal_lr_mult=10.0))
    groups = sae.optim_groups(1e-3)
    names = {id(p): n for n, p in sae.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-2)]
    assert {names[id(p)] for p in groups[1]["params"]} == {"encoder.P", "encoder.W_qkv", "encoder.U", "encoder.gate_logit"}
    assert sum(len(g["params"]) for g in groups) == len(list(sae.parameters()))


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
def test_every_real_step_keeps_decoder_rows_at_unit_norm(tiny_store, tmp_path, sparsity):
    """The invariant of unit-norm sparsities, held on the trainer's own step (not a loop of the test's): after one
    `train_step` from rows deliberately off unit norm, and on the SAE a finished `train_sae` saves. A step that
    skipped its renormalisation fails both (a large learning rate moves the rows well off the sphere)."""
    from trsae.saes import make_sae
    from trsae.train import train_step

    cfg = SAEConfig.build(tiny_store.d_model, 64, sparsity, k=4)
    sae = make_sae(cfg)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 64)[:, None])
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    b = next(tiny_store.batches("train", batch_size=4))
    train_step(sae, opt, b.acts_BTD, b.mask_BT, b.pos_BT)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-5)
    run = train_sae(cfg, TrainConfig(tokens=32 * 4 * 6, batch_size=4, crop_len=32, lr=0.05), tiny_store,
                    tmp_path / "run", progress=False)
    torch.testing.assert_close(load_sae(tmp_path / "run" / "sae").W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-5)
    assert run.sparsity.unit_norm
