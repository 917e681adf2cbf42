"""Hook sites and models beyond the named ones (`trsae.lm`): each site of a GPT-2, a Llama (SmolLM's family), a Gemma 2
and a Gemma 3 model, all tiny and random, built offline from configs and saved to disk with the real GPT-2
tokenizer, against independent references:

- the sites are what each sub-layer adds to the residual stream: ``hidden_states[L] + attn_out + mlp_out`` equals
  ``hidden_states[L + 1]`` (transformers' own output, without the project's table of modules);
- reading and replacing a site equal a plain torch forward hook on the module named here by hand;
- a harvest of several sites in one pass writes the stores that harvesting each alone writes, byte for byte, with
  one forward per batch;
- a local folder loads offline; an unsupported architecture or an unreachable hub id fails in one line."""

from __future__ import annotations

import json

import pytest
import torch

from trsae.config import SITES, HarvestConfig
from trsae.lm import ModelError, hook_name, load_model, logits_with_replacement, site_acts

FAMILIES = ("gpt2", "llama", "gemma2", "gemma3_text")

# The module whose output is each site, named by hand from each family's modeling code (transformers 5): a block's
# attention returns (output, weights); Gemma 2 and 3 normalise each sub-layer's output before adding it.
HAND = {
    "gpt2": lambda hf, L: {"resid_post": (hf.transformer.h[L], None), "attn_out": (hf.transformer.h[L].attn, 0),
                           "mlp_out": (hf.transformer.h[L].mlp, None)},
    "llama": lambda hf, L: {"resid_post": (hf.model.layers[L], None), "attn_out": (hf.model.layers[L].self_attn, 0),
                            "mlp_out": (hf.model.layers[L].mlp, None)},
    "gemma2": lambda hf, L: {"resid_post": (hf.model.layers[L], None),
                             "attn_out": (hf.model.layers[L].post_attention_layernorm, None),
                             "mlp_out": (hf.model.layers[L].post_feedforward_layernorm, None)},
}
HAND["gemma3_text"] = HAND["gemma2"]


def _tiny_hf(family: str):
    import transformers as tf

    from trsae.lm import tiny_gpt2_config

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tiny_gpt2_config(n_layer=3))
    kw = dict(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, bos_token_id=50256, eos_token_id=50256, max_position_embeddings=256)
    config, model = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
                     "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[family]
    return model(config(**kw))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, data_dir):
    """Each family's tiny model saved by transformers, with the GPT-2 tokenizer, in a folder of its own."""
    from trsae.lm import gpt2_tokenizer

    tok = gpt2_tokenizer(data_dir)
    out = {}
    for family in FAMILIES:
        out[family] = tmp_path_factory.mktemp(family)
        _tiny_hf(family).save_pretrained(out[family])
        tok.save_pretrained(out[family])
    return out


@pytest.fixture(scope="module")
def models(folders):
    return {f: load_model(str(p)) for f, p in folders.items()}


def _ids(n=2, T=10, seed=0):
    ids = torch.randint(300, 5000, (n, T), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 50256
    return ids


def _hooked(model, family, layer, site, fn):
    """Run the plain transformers model with ``fn`` applied to the hand-named module's output of ``site``."""
    module, index = HAND[family](model.hf, layer)[site]

    def hook(_, __, out):
        if index is None:
            return fn(out)
        return (*out[:index], fn(out[index]), *out[index + 1:])

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.hf(_ids()).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_are_what_each_sublayer_adds_to_the_residual_stream(models, family):
    model = models[family]
    ids = _ids()
    with torch.no_grad():
        hs = model.hf(ids, output_hidden_states=True).hidden_states
    for layer in range(model.n_layers - 1):  # the last entry of hidden_states has the final norm applied
        resid, attn, mlp = site_acts(model, [(layer, "resid_post"), (layer, "attn_out"), (layer, "mlp_out")], ids)
        torch.testing.assert_close(resid, hs[layer + 1], rtol=0, atol=0)
        torch.testing.assert_close(hs[layer] + attn + mlp, hs[layer + 1], rtol=1e-5, atol=1e-5)
        assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3  # neither term is trivially zero


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_reading_and_replacing_a_site_equal_a_plain_forward_hook(models, family, site):
    model, layer = models[family], 1
    seen = []
    _hooked(model, family, layer, site, lambda h: seen.append(h.clone()) or h)
    torch.testing.assert_close(site_acts(model, [(layer, site)], _ids())[0], seen[0], rtol=0, atol=0)

    f = lambda h: 0.5 * h + 0.1  # noqa: E731
    ref = _hooked(model, family, layer, site, f)
    got = logits_with_replacement(model, layer, _ids(), f, site=site)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with torch.no_grad():
        assert (got - model.hf(_ids()).logits).abs().max() > 1e-4  # the replacement did change the output


def test_sites_of_one_pass_come_back_in_the_order_asked(models):
    model, ids = models["llama"], _ids()
    asked = [(2, "resid_post"), (0, "mlp_out"), (1, "attn_out"), (0, "attn_out")]
    for (layer, site), acts in zip(asked, site_acts(model, asked, ids)):
        torch.testing.assert_close(acts, site_acts(model, [(layer, site)], ids)[0], rtol=0, atol=0)
    with pytest.raises(ModelError, match="unknown hook site 'resid_pre'"):
        site_acts(model, [(0, "resid_pre")], ids)
    assert hook_name(6, "attn_out") == "blocks.6.hook_attn_out"


def _cfg(model, **kw):
    return HarvestConfig(model=model, data="brown", tokens=24 * 16, ctx_len=16, seqs_per_shard=8, batch_size=4,
                         val_frac=0.125, test_frac=0.125, **kw)


def _files(store):
    return {sh["file"]: sh["sha256"] for sh in store.manifest["shards"]}


def test_one_pass_harvest_writes_the_stores_each_harvest_alone_writes(folders, models, tmp_path, monkeypatch):
    import trsae.store as st

    name = str(folders["gemma3_text"])
    pairs = [(1, "attn_out"), (0, "mlp_out"), (2, "resid_post")]
    cfgs = [_cfg(name, layer=layer, site=site) for layer, site in pairs]
    calls = []
    real = st.site_acts
    monkeypatch.setattr(st, "site_acts", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    together = st.harvest_sites(cfgs, [tmp_path / f"t{i}" for i in range(3)], model=models["gemma3_text"],
                                progress=False)
    assert len(calls) == 24 // 4 and all(sorted(c) == sorted(pairs) for c in calls)  # one forward per batch
    for i, cfg in enumerate(cfgs):
        alone = st.harvest(cfg, tmp_path / f"a{i}", model=models["gemma3_text"], progress=False)
        assert _files(together[i]) == _files(alone) and together[i].norm_scale == alone.norm_scale
        assert (together[i].layer, together[i].site) == pairs[i] == (alone.layer, alone.site)
    ids = together[0].sequence(0)[1].long()[None]
    torch.testing.assert_close(together[0].sequence(0)[0][None],
                               site_acts(models["gemma3_text"], [(1, "attn_out")], ids)[0], rtol=0, atol=0)


def test_a_partial_site_store_resumes_inside_a_joint_harvest(folders, models, tmp_path):
    """One store half written alone, then harvested with another site: both end as a harvest alone writes them."""
    from trsae.store import harvest, harvest_sites

    name, model = str(folders["llama"]), models["llama"]
    a, b = _cfg(name, layer=1, site="attn_out"), _cfg(name, layer=2, site="mlp_out")
    harvest(a, tmp_path / "a", model=model, progress=False, max_shards=1)
    stores = harvest_sites([a, b], [tmp_path / "a", tmp_path / "b"], model=model, progress=False)
    for cfg, got in zip((a, b), stores):
        assert _files(got) == _files(harvest(cfg, tmp_path / f"ref-{cfg.site}", model=model, progress=False))
    with pytest.raises(ValueError, match="may differ only in layer, site"):
        harvest_sites([a, _cfg(name, layer=1, site="mlp_out", split_seed=1)], [tmp_path / "c", tmp_path / "d"],
                      model=model)


def test_cli_harvests_several_sites_of_a_local_folder(folders, tmp_path, capsys):
    from trsae.__main__ import main
    from trsae.store import ActivationStore

    out = tmp_path / "stores"
    assert main(["harvest", "--model", str(folders["llama"]), "--data", "brown", "--tokens", "256", "--ctx-len",
                 "16", "--seqs-per-shard", "8", "--sites", "0:attn_out", "2:resid_post", "--out", str(out),
                 "--quiet"]) == 0
    for layer, site in ((0, "attn_out"), (2, "resid_post")):
        m = json.loads((out / f"L{layer}-{site}" / "manifest.json").read_text())
        assert (m["layer"], m["site"], m["complete"]) == (layer, site, True)
        assert ActivationStore(out / f"L{layer}-{site}").site == site
    assert main(["harvest", "--model", str(folders["llama"]), "--sites", "0:attn", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "site must be one of resid_post, attn_out, mlp_out" in capsys.readouterr().err
    assert main(["harvest", "--model", str(folders["llama"]), "--sites", "attn_out", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "LAYER:SITE" in capsys.readouterr().err


def test_unsupported_architecture_and_unreachable_hub_id_fail_in_one_line(tmp_path, capsys, monkeypatch):
    from transformers import BertConfig

    from trsae.__main__ import main

    BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="'bert' model; supported architectures .*gpt2, llama"):
        load_model(str(tmp_path / "bert"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="needs the model hub .*not reachable"):
        load_model("someone/no-such-model-here")
    with pytest.raises(ModelError, match="unknown model 'gpt-5'.*a folder that exists, or a hub id"):
        load_model("gpt-5")
    for model in (str(tmp_path / "bert"), "someone/no-such-model-here"):
        assert main(["harvest", "--model", model, "--out", str(tmp_path / "s"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def _cell(fvu, ce, se=0.01, n=2, gap=0.2, conc=0.1, depth=0.5, gap_size=0.05):
    leaf = lambda m: {"mean": m, "se": se, "n": n}  # noqa: E731
    return {"paired": {"fvu_ratio": leaf(fvu), "ce_gap_ratio": leaf(ce)},
            "apart_from_one": {"fvu_ratio": abs(fvu - 1) > 2 * se, "ce_gap_ratio": abs(ce - 1) > 2 * se},
            "ceiling": {"gap_closed": leaf(gap), "amortisation_gap": leaf(gap_size)},
            "concentration": {"top_token_share": conc}, "depth": depth}


def test_site_verdicts_points_and_macros_read_the_cells_as_written():
    from trsae import analysis, report

    maps = {"m": {(3, "attn_out"): _cell(0.90, 1.00, gap=0.5, conc=0.6, depth=0.25),
                  (3, "resid_post"): _cell(1.10, 0.95, gap=-0.1, depth=0.25),
                  (7, "resid_post"): _cell(1.01, 0.99, gap=9.0, gap_size=0.001)}}  # a gap within 2 se of 0
    table = analysis.site_table(maps)
    assert list(table) == ["m L3 attn_out", "m L3 resid_post", "m L7 resid_post"]
    v = analysis.site_verdicts(table, "fvu_ratio")
    assert v == {"below": ["m L3 attn_out"], "above": ["m L3 resid_post"], "within": ["m L7 resid_post"]}
    assert analysis.site_points(maps, "fvu_ratio") == {"m attn_out": [(0.25, 0.90, 0.01)],
                                                       "m resid_post": [(0.25, 1.10, 0.01), (0.5, 1.01, 0.01)]}
    verdicts = {key: analysis.site_verdicts(table, key) for key in report.SITE_RATIOS}
    assert analysis.site_gap_cells(table) == ["m L3 attn_out", "m L3 resid_post"]
    m = report.site_macros(table, verdicts, analysis.site_gap_cells(table), harvest_tokens=1000, train_tokens=500,
                           n_seeds=2)
    assert m["siteFvuBelow"] == r"m L3 attn\_out" and m["siteFvuWithin"] == r"m L7 resid\_post"
    assert m["siteCeGapBelow"] == r"m L3 resid\_post" and m["siteCeGapAbove"] == "no site"
    assert m["siteCeGapWithin"] == r"m L3 attn\_out and m L7 resid\_post"
    assert m["siteFvuLowest"].endswith(r"(m L3 attn\_out)") and m["siteFvuHighest"].endswith(r"(m L3 resid\_post)")
    assert m["siteConcentrated"] == r"m L3 attn\_out"
    # the share of a gap within two standard errors of zero is not read: 9.0 at L7 is left out
    assert m["siteGapClosed"].startswith("where TopK's amortisation gap is more than two standard errors above zero (2 "
                                         "of the 3 cells), the TRSAE closes from ")
    assert r"(m L3 resid\_post) to " in m["siteGapClosed"] and m["siteGapClosed"].endswith(r"(m L3 attn\_out) of it")
    for gap_size in (0.001, -0.5):
        none = {label: _cell(1.0, 1.0, gap_size=gap_size) for label in ("a", "b")}
        assert analysis.site_gap_cells(none) == []
        assert "within two standard errors of zero at every cell" in report.site_macros(
            none, {k: analysis.site_verdicts(none, k) for k in report.SITE_RATIOS}, [], 1, 1, 2)["siteGapClosed"]


def test_site_map_trains_and_scores_each_cell_of_one_harvest(tmp_path, tiny_model, monkeypatch):
    """End to end on tiny-gpt2: the stores of both cells come from one harvest, each cell's SAEs are scored on its own
    store (a TopK's FVU there equals `evaluate_sae` of the same run's SAE on that store), at its relative depth."""
    import trsae.runner as runner
    import trsae.store as st
    from trsae import experiments
    from trsae.config import TrainConfig
    from trsae.evaluate import evaluate_sae

    monkeypatch.setitem(runner._MODELS, ("tiny-gpt2", torch.float32), tiny_model)
    calls = []
    real = st.harvest_sites
    monkeypatch.setattr(runner, "harvest_sites", lambda cfgs, *a, **k: calls.append(len(cfgs)) or real(cfgs, *a, **k))
    harvest = {"model": "tiny-gpt2", "layer": 1, "data": "brown", "tokens": 40 * 32, "ctx_len": 32, "test_frac": 0.2}
    specs = lambda d: experiments.temporal_specs(d, 4 * d, 4, window=4)  # noqa: E731
    train = TrainConfig(tokens=2048, batch_size=8, crop_len=16, context=8)
    res = runner.site_map([(1, "attn_out"), (3, "resid_post")], harvest, specs, ("TRSAE", "TopK"), [0, 1], train,
                          tmp_path, eval_seqs=2, density_tokens=256, progress=False)
    assert calls == [2]
    assert {c: r["depth"] for c, r in res.items()} == {(1, "attn_out"): 0.5, (3, "resid_post"): 1.0}
    from trsae.config import HarvestConfig

    store = runner.ensure_store(HarvestConfig(**(harvest | {"layer": 1, "site": "attn_out"})), tmp_path, progress=False)
    sae, _ = runner.ensure_sae(specs(store.d_model)["TopK"], train, store, tmp_path, progress=False)
    alone = evaluate_sae(sae, store, tiny_model, max_seqs=2, density_tokens=256, recon_seqs=runner.RECON_SEQS)
    fvu = res[1, "attn_out"]["versus"]["fvu_b"]["values"][0]
    assert fvu == pytest.approx(1 - alone["reconstruction_quality"]["explained_variance"], rel=1e-6)
    assert res[1, "attn_out"]["paired"]["fvu_ratio"]["n"] == 2
