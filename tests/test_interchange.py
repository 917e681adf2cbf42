"""SAELens on-disk interchange, checked against the sae-lens package itself: what we export, SAELens loads
and encodes/decodes exactly as we do; what SAELens saves, we import and encode exactly as SAELens does."""

import json
import os

import pytest
import torch

from trsae.interchange import TEMPORAL_ARCHITECTURE, TRSAE_NOTE, InterchangeError, export_saelens, import_saelens
from trsae.saes import SAEConfig, make_sae

if os.environ.get("CI"):  # CI installs the extra: a missing package there is a failure, not a skip
    import sae_lens
else:
    sae_lens = pytest.importorskip("sae_lens", reason="the optional extra: pip install -e '.[saelens]'")

D, F, K, SCALE = 24, 96, 6, 3.7


def _trained_like(cfg):
    """An SAE with every parameter random (so that b_dec, b_enc and the scale all matter)."""
    torch.manual_seed(0)
    sae = make_sae(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        if sae.cfg.sparsity.name in ("batchtopk", "matryoshka"):
            sae.sparsity.threshold.fill_(0.4)
        if sae.cfg.sparsity.name == "jumprelu":
            sae.sparsity.threshold.uniform_(0.1, 0.6)
    return sae.eval()


def _x():
    return torch.randn(2, 10, D, generator=torch.Generator().manual_seed(1)) * 2.0


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_export_loads_in_saelens_with_identical_codes_and_reconstructions(arch, tmp_path):
    ours = _trained_like(SAEConfig.build(D, F, arch, input_scale=SCALE, **({} if arch == "relu" else {"k": K})))
    export_saelens(ours, tmp_path / "sae", model_name="tiny-gpt2", hook_name="layer 1")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    x = _x()
    with torch.no_grad():
        codes_ours = ours.encode(x * SCALE)
        codes_theirs = theirs.encode(x)
        torch.testing.assert_close(codes_theirs, codes_ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(codes_theirs), ours.reconstruct(x), rtol=1e-5, atol=1e-5)
    assert (codes_ours > 0).any() and (codes_ours == 0).any()  # a real sparse code, not all on or all off
    if arch == "topk":
        assert int((codes_ours > 0).sum(-1).max()) <= K
    back = import_saelens(tmp_path / "sae")  # and the export reads back as the same part
    assert back.cfg.sparsity == ours.cfg.sparsity
    torch.testing.assert_close(back.encode(x), codes_ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder, kw", [("trsae", {"window": 4}), ("trsae", {"window": 4, "pred_k": 2}),
                                         ("tfa", {})])
def test_a_temporal_sae_loads_in_saelens_and_encodes_sequences_as_here(encoder, kw, tmp_path):
    import trsae.saelens  # noqa: F401  (registers the architecture with SAELens)

    ours = _trained_like(SAEConfig.build(D, F, "topk", encoder, k=K, input_scale=SCALE, **kw))
    cfg = json.loads((export_saelens(ours, tmp_path / "sae", hook_name="layer 1") / "cfg.json").read_text())
    assert cfg["architecture"] == TEMPORAL_ARCHITECTURE and cfg["metadata"]["hook_name"] == "layer 1"
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    x = _x()
    pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    with torch.no_grad():
        codes_ours = ours.encode(x * SCALE, pos_BT=pos, mask_BT=pos > 0)  # position 0 is BOS, as in a store
        codes_theirs = theirs.encode(x)
        torch.testing.assert_close(codes_theirs, codes_ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(codes_theirs), ours.decode(codes_ours) / SCALE, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours.decode(codes_ours) / SCALE, rtol=1e-5, atol=1e-5)
        # the codes read the context: another earlier token changes a later token's code
        x2 = x.clone()
        x2[:, 3] += 1.0
        assert not torch.allclose(theirs.encode(x2)[:, 6], codes_theirs[:, 6])
        assert torch.equal(theirs.encode(x2)[:, :3], codes_theirs[:, :3])  # causal: earlier codes stay
    with pytest.raises(ValueError, match=r"\[batch, seq, d_in\]"):
        theirs.encode(x[0])
    back = import_saelens(tmp_path / "sae")
    assert back.cfg == ours.cfg
    torch.testing.assert_close(back.encode(x * SCALE, pos_BT=pos, mask_BT=pos > 0), codes_ours)


def test_trsae_exports_its_per_token_dictionary_with_a_note(tmp_path):
    tr = _trained_like(SAEConfig.build(D, F, "topk", "trsae", k=K, window=4, input_scale=SCALE))
    export_saelens(tr, tmp_path / "sae", per_token=True)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["trsae_note"] == TRSAE_NOTE
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    per_token = make_sae(tr.cfg).eval()
    per_token.load_state_dict(tr.state_dict())
    per_token.encoder.set_window(0)
    with torch.no_grad():
        per_token.encoder.P.zero_()
        x = _x()
        torch.testing.assert_close(theirs.encode(x), per_token.encode(x * SCALE), rtol=1e-5, atol=1e-5)
        # ... which is not what the TRSAE itself computes: the note is needed
        assert not torch.allclose(tr.encode(x * SCALE), per_token.encode(x * SCALE))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "jumprelu-per-latent"])
def test_import_of_a_saelens_sae_encodes_as_saelens_does(arch, tmp_path):
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(2)
    theirs = {"standard": lambda: StandardSAE(StandardSAEConfig(d_in=D, d_sae=F)),
              "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=K)),
              "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F)),
              "jumprelu-per-latent": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F))}[arch]()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.full_like(p, 0.3) if name == "threshold" else torch.randn_like(p) * 0.3)
        if arch == "jumprelu-per-latent":
            theirs.threshold.uniform_(0.0, 0.6)
    theirs.save_model(tmp_path / "sae")
    ours = import_saelens(tmp_path / "sae")
    assert ours.cfg.sparsity.name == {"standard": "relu", "topk": "topk", "jumprelu": "batchtopk",
                                      "jumprelu-per-latent": "jumprelu"}[arch]
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.reconstruct(x), theirs.decode(theirs.encode(x)), rtol=1e-5, atol=1e-5)


def test_import_refuses_what_it_cannot_represent(tmp_path):
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig

    GatedSAE(GatedSAEConfig(d_in=D, d_sae=F)).save_model(tmp_path / "gated")
    with pytest.raises(InterchangeError, match="'gated' is not supported"):
        import_saelens(tmp_path / "gated")
    untrained = make_sae(SAEConfig.build(D, F, "batchtopk", k=K))
    with pytest.raises(InterchangeError, match="no calibrated inference threshold"):
        export_saelens(untrained, tmp_path / "untrained")
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        import_saelens(tmp_path / "missing")
