"""The dashboard's data against independent references: top contexts against an argsort of `SAE.encode`'s codes,
the TRSAE terms against `SAE.pre_acts`, the attention weights against the O(T) context read, the logits
against a hand-written LayerNorm and unembedding, neighbours against a brute-force cosine; and the size and
paging of a 5120-feature site."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from trsae.dashboard import Settings, build, load_labels
from trsae.dashboard.collect import collect, window_weights
from trsae.dashboard.data import parse_labels
from trsae.dashboard.site import HERE, STATIC, js_call
from trsae.dashboard.weights import nearest, unembed_directions
from trsae.saes import SAE, SAEConfig
from trsae.saes.context import feature_map, windowed_linear_attention

ROOT = Path(__file__).resolve().parents[1]


def random_sae(width: int, encoder: str = "token", seed: int = 0, **kw) -> SAE:
    """An untrained SAE with non-trivial temporal parameters (P, U, gates) so that every term matters."""
    sae = SAE(SAEConfig.build(64, width, "topk", encoder, k=kw.pop("k", 8), seed=seed, **kw)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1, generator=g)
        sae.encoder.b_enc.normal_(0, 0.1, generator=g)
        for name in ("P", "U", "gate_logit", "G"):
            if hasattr(sae.encoder, name):
                getattr(sae.encoder, name).normal_(0, 0.5, generator=g)
    return sae


def read_js(path: Path) -> dict:
    """The JSON inside ``TRSAE.fn(<json>);``."""
    text = path.read_text(encoding="utf-8")
    return json.loads(text[text.index("(") + 1:text.rindex(")")])


def naive_codes(sae: SAE, store, split: str = "train"):
    """codes [S, T, F], pre-activations [S, T, F], mask [S, T] and store sequence ids [S] through the public API,
    one sequence at a time."""
    seqs = store.splits[split].tolist()
    codes, pre, masks = [], [], []
    special = torch.tensor(store.manifest["special_ids"])
    for s in seqs:
        acts_TD, ids_T = store.sequence(s)
        x = acts_TD.float()[None] * store.norm_scale
        mask = ~torch.isin(ids_T.long(), special)[None]
        pos = torch.arange(x.shape[1])[None]
        with torch.no_grad():
            codes.append(sae.encode(x, pos_BT=pos, mask_BT=mask)[0] * mask[0, :, None])
            pre.append(sae.pre_acts(x, pos_BT=pos, mask_BT=mask)[0])
        masks.append(mask[0])
    return torch.stack(codes), torch.stack(pre), torch.stack(masks), np.array(seqs)


@pytest.fixture(scope="module")
def saes():
    return {"topk": random_sae(96, seed=1),
            "trsae-topk": random_sae(96, "trsae", seed=2, window=4, d_k=8, d_v=16, d_ctx=16)}


@pytest.fixture(scope="module")
def site(saes, tiny_store, tiny_model, tmp_path_factory):
    labels = {"3": ["NOUN", 0.75], "5": [["VERB", 0.5], ["ADJ", 0.9]]}
    return build(tiny_store, list(saes.values()), tmp_path_factory.mktemp("dash"), model=tiny_model,
                 labels=[labels, None], split="train")


def record(site, name: str, f: int) -> dict:
    return read_js(site.out / name / "data" / "f" / f"{f}.js")


@pytest.mark.parametrize("name", ["topk", "trsae-topk"])
def test_top_contexts_are_the_argsort_of_the_codes(site, saes, tiny_store, name):
    codes, _, mask, seqs = naive_codes(saes[name], tiny_store)
    S, T, F = codes.shape
    n_valid = int(mask.sum())
    checked = 0
    for f in range(F):
        rec = record(site, name, f)
        flat = codes[..., f].reshape(-1)
        n_act = int((flat > 0).sum())
        assert rec["n_active"] == n_act
        assert rec["density"] == pytest.approx(n_act / n_valid, rel=5e-3)
        assert sum(rec["hist"]["counts"]) == n_act
        want = flat.sort(descending=True).values[:min(10, n_act)]
        assert len(rec["top"]) == len(want)  # the n largest codes (in any order among ties: position 1
        assert len({(c["seq"], c["t"]) for c in rec["top"]}) == len(want)  # repeats across sequences)
        row_of = {int(q): i for i, q in enumerate(seqs)}
        for c, w in zip(rec["top"], want.tolist()):
            s, t = row_of[c["seq"]], c["t"]
            assert float(codes[s, t, f]) == pytest.approx(w, rel=1e-6)
            assert c["act"][c["i"]] == pytest.approx(w, rel=5e-3)
            lo = t - c["i"]  # every shown code is that token's code
            for j, a in enumerate(c["act"]):
                assert a == pytest.approx(float(codes[s, lo + j, f]), rel=5e-3, abs=1e-6)
        checked += n_act > 0
    assert checked > F // 2


def test_quantile_bands_are_disjoint_and_ordered(site):
    for f in range(20):
        rec = record(site, "topk", f)
        bands = [[c["act"][c["i"]] for c in b["ctx"]] for b in rec["bands"]]
        assert all(v > 0 for b in bands for v in b)
        for lower, upper in zip(bands, bands[1:]):
            assert max(lower) <= min(upper)
        if bands:
            assert max(bands[-1]) <= rec["max"]


def test_position_profile_is_the_mean_code_per_position(site, saes, tiny_store):
    codes, _, mask, _ = naive_codes(saes["topk"], tiny_store)
    mean_TF = codes.sum(0) / mask.sum(0).clamp_min(1)[:, None]
    for f in (0, 7, 33):
        rec = record(site, "topk", f)
        assert rec["pos"]["start"] == list(range(codes.shape[1]))
        np.testing.assert_allclose(rec["pos"]["mean"], mean_TF[:, f].numpy(), rtol=5e-3, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(per_token_gates=True), dict(use_pos=False), dict(use_attn=False)])
def test_temporal_terms_sum_to_the_pre_activation(tiny_store, kw):
    sae = random_sae(48, "trsae", seed=3, window=5, d_k=8, d_v=16, d_ctx=12, **kw)
    p = collect(sae, tiny_store, "train")
    _, pre, _, _ = naive_codes(sae, tiny_store)
    z_ref = pre.reshape(-1, pre.shape[-1])[p.row_M, p.feat_M].numpy()
    np.testing.assert_allclose(p.terms_M3.sum(1), z_ref, rtol=1e-4, atol=1e-4)
    tok, pos, ctx = np.abs(p.terms_M3).mean(0)
    assert tok > 0
    assert (pos > 0) == kw.get("use_pos", True)
    assert (ctx > 0) == kw.get("use_attn", True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3, 7])
def test_window_weights_reproduce_the_context_read(causal, window):
    g = torch.Generator().manual_seed(window)
    T, K, V = 12, 4, 5
    q, k, v = (torch.randn(T, n, generator=g) for n in (K, K, V))
    mask = torch.ones(T, dtype=torch.bool)
    mask[[0, 5]] = False
    fq, fk = feature_map(q), feature_map(k)
    ref = windowed_linear_attention(fq[None], fk[None], v[None], window, mask[None], causal=causal)[0]
    for t in range(T):
        w = window_weights(fq.numpy(), fk.numpy(), mask.numpy(), t, window, causal)
        assert all(mask[s] and s != t and abs(s - t) <= window for s in w)
        assert all(s < t for s in w) or not causal
        got = sum((a * v[s] for s, a in w.items()), torch.zeros(V))
        torch.testing.assert_close(got, ref[t], rtol=1e-4, atol=1e-5)
        if w:
            assert sum(w.values()) == pytest.approx(1.0, abs=1e-5)


def test_temporal_record_has_terms_and_attention(site, saes):
    enc = saes["trsae-topk"].encoder
    shown = 0
    for f in range(30):
        rec = record(site, "trsae-topk", f)
        t = rec["temporal"]
        assert t["window"] == 4 and len(t["P"]) == enc.cfg.n_buckets
        with torch.no_grad():
            want = float(enc.context_strength()[f] / enc.token_strength()[f])
        assert t["ctx_strength"] == pytest.approx(want, rel=5e-3)
        for c in rec["top"]:
            assert len(c["terms"]) == 3 and len(c["attn"]) == len(c["tok"])
            assert c["act"][c["i"]] == pytest.approx(sum(c["terms"]), rel=0.02, abs=0.02)  # TopK: code = z
            assert all(a == 0 for a in c["attn"][c["i"]:])  # causal: no weight on the token or later
            if sum(c["attn"]) > 0:
                assert sum(c["attn"]) == pytest.approx(1.0, abs=0.03)
                shown += 1
    assert shown > 0
    assert record(site, "topk", 0)["temporal"] is None


def test_unembedding_is_layernorm_then_lm_head(tiny_model):
    hf = copy.deepcopy(tiny_model.hf)
    g = torch.Generator().manual_seed(0)
    ln = hf.transformer.ln_f
    with torch.no_grad():
        ln.weight.copy_(1 + 0.5 * torch.randn(ln.weight.shape, generator=g))
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=g))
    d = torch.randn(5, 64, generator=g)
    centred = d - d.mean(1, keepdim=True)
    normed = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + ln.eps) * ln.weight
    want = normed @ hf.transformer.wte.weight.T  # GPT-2 ties lm_head to wte
    torch.testing.assert_close(unembed_directions(d, hf), want, rtol=1e-4, atol=1e-4)


def test_logits_in_the_site_are_the_extremes(site, saes, tiny_model):
    W = saes["topk"].W_dec.detach()
    ln = tiny_model.hf.transformer.ln_f
    c = W - W.mean(1, keepdim=True)
    logits = (c / torch.sqrt(c.pow(2).mean(1, keepdim=True) + ln.eps) * ln.weight + 0) @ \
        tiny_model.hf.transformer.wte.weight.T
    for f in (0, 11, 95):
        rec = record(site, "topk", f)
        top = logits[f].topk(10).indices.tolist()
        bottom = logits[f].topk(10, largest=False).indices.tolist()
        assert [x[0] for x in rec["logits"]["top"]] == [tiny_model.tokenizer.decode([i]) for i in top]
        assert [x[0] for x in rec["logits"]["bottom"]] == [tiny_model.tokenizer.decode([i]) for i in bottom]
        assert rec["logits"]["top"][0][1] == pytest.approx(float(logits[f].max()), rel=5e-3)


def test_neighbours_and_matches_are_brute_force_cosines(site, saes):
    A, B = (saes[n].W_dec.detach() for n in ("topk", "trsae-topk"))
    cos_AA = torch.nn.functional.cosine_similarity(A[:, None], A[None], dim=-1)
    cos_AA.fill_diagonal_(-2)
    cos_AB = torch.nn.functional.cosine_similarity(A[:, None], B[None], dim=-1)
    idx, val = nearest(A, n=8)
    assert torch.equal(idx, cos_AA.topk(8, dim=1).indices)
    torch.testing.assert_close(val, cos_AA.topk(8, dim=1).values)
    for f in (0, 40):
        rec = record(site, "topk", f)
        assert [n[0] for n in rec["nbrs"]] == cos_AA[f].topk(8).indices.tolist()
        assert rec["match"][0] == int(cos_AB[f].argmax()) and rec["other"] == "trsae-topk"
        assert rec["match"][1] == pytest.approx(float(cos_AB[f].max()), abs=0.006)


def test_labels_are_optional_and_shown(site, tmp_path):
    index = read_js(site.out / "topk" / "data" / "index.js")
    col = {c: i for i, c in enumerate(index["columns"])}
    rows = index["rows"]
    assert len(rows) == 96 and index["meta"]["has_labels"]
    assert (rows[3][col["label"]], rows[3][col["f1"]]) == ("NOUN", 0.75)
    assert (rows[5][col["label"]], rows[5][col["f1"]]) == ("ADJ", 0.9)  # best F1 first
    assert rows[4][col["label"]] is None
    assert record(site, "topk", 5)["labels"] == [["ADJ", 0.9], ["VERB", 0.5]]
    other = read_js(site.out / "trsae-topk" / "data" / "index.js")
    assert not other["meta"]["has_labels"] and other["rows"][3][col["label"]] is None
    assert other["rows"][3][col["ctx"]] is not None and rows[3][col["ctx"]] is None
    with pytest.raises(ValueError, match="feature '1'"):
        parse_labels({"1": "NOUN"})
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold an object"):
        load_labels(bad)


def test_pages_and_assets_exist(site):
    out = site.out
    for rel in ["index.html", "compare.html", *(f"static/{s}" for s in STATIC), "topk/index.html",
                "topk/feature.html", "trsae-topk/data/f/95.js"]:
        assert (out / rel).is_file(), rel
    html = (out / "topk" / "index.html").read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert "<th data-col=\"label\">" in html and "<th data-col=\"ctx\"" not in html
    assert "<th data-col=\"ctx\"" in (out / "trsae-topk" / "index.html").read_text()
    assert "tiny-gpt2 layer 1 resid_post" in html  # the page names the store's hook site
    assert read_js(out / "topk" / "data" / "index.js")["meta"]["site"] == "resid_post"


def test_data_can_never_close_its_script():
    text = js_call("feature", {"tok": ["</script><b>"]})
    assert "</" not in text and json.loads(text[14:-3]) == {"tok": ["</script><b>"]}


def test_templates_and_static_are_package_data():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["trsae.dashboard"]
    files = [p.relative_to(HERE).as_posix() for p in HERE.rglob("*") if p.is_file() and p.suffix != ".py"
             and "__pycache__" not in p.parts]
    for f in files:
        assert any(Path(f).match(g) for g in globs), f"{f} is not declared as package data"
    assert {"templates/index.html.j2", "static/common.js"} <= set(files)


def test_large_dictionary_site_stays_small(tiny_store, tiny_model, tmp_path):
    """F = 5120: the index is one data file of one row per feature, pages of 100 rows in the browser, and the
    whole site stays far below 50 MB."""
    sae = random_sae(5120, seed=4, k=32)
    site = build(tiny_store, sae, tmp_path, model=tiny_model, split="train",
                 settings=Settings(n_top=10, per_band=3))
    index_file = site.out / "topk" / "data" / "index.js"
    index = read_js(index_file)
    assert len(index["rows"]) == 5120 and index["meta"]["width"] == 5120
    assert index_file.stat().st_size < 1_500_000
    assert len(list((site.out / "topk" / "data" / "f").iterdir())) == 5120
    assert site.bytes["topk"] < 50e6
    print(f"F=5120 site: {site.bytes['topk'] / 1e6:.1f} MB, index {index_file.stat().st_size / 1e3:.0f} kB, "
          f"built in {site.seconds:.1f} s")


def test_cli_builds_a_dashboard(tiny_store, saes, tmp_path, capsys):
    from trsae.__main__ import main

    for name, sae in saes.items():
        sae.save(tmp_path / name / "sae")
    (tmp_path / "labels.json").write_text(json.dumps({"0": ["x", 0.5]}))
    rc = main(["dashboard", "--store", str(tiny_store.path), "--sae", str(tmp_path / "topk"),
               "--sae", str(tmp_path / "trsae-topk" / "sae"), "--labels", str(tmp_path / "labels.json"),
               "--split", "val", "--out", str(tmp_path / "site"), "--quiet"])
    assert rc == 0
    assert (tmp_path / "site" / "compare.html").is_file()
    assert (tmp_path / "site" / "trsae-topk" / "feature.html").is_file()
    assert "open " in capsys.readouterr().out
    rc = main(["dashboard", "--store", str(tiny_store.path), "--sae", str(tmp_path / "topk"),
               "--labels", "a.json", "--labels", "b.json", "--out", str(tmp_path / "site2")])
    assert rc == 2 and "2 --labels files for 1 --sae" in capsys.readouterr().err


def test_without_a_model_tokens_are_ids_and_no_logits(tiny_store, tmp_path):
    site = build(tiny_store, random_sae(16, seed=5), tmp_path, logits=False, split="val", names=["plain"])
    rec = record(site, "plain", int(np.argmax([record(site, "plain", f)["n_active"] for f in range(16)])))
    assert rec["logits"] is None and rec["top"]
    assert all(t.startswith("<") and t.endswith(">") for t in rec["top"][0]["tok"])
    assert site.page() == tmp_path / "plain" / "index.html"


@pytest.mark.parametrize("encoder, kw", [("trsae", dict(window=4, pred_k=3)), ("tfa", dict())])
def test_collected_codes_are_the_saes_own_codes_predicted_ones_included(tiny_store, encoder, kw):
    """A predicting SAE (TFA; a TRSAE with pred_k) shows novel plus predicted codes, as `SAE.encode` and the
    evaluation count them: the pairs rebuild exactly the codes of `SAE.encode` on the same tokens."""
    sae = random_sae(48, encoder, seed=5, **kw)
    with torch.no_grad():
        for name in ("V_pred", "b_pred"):
            if hasattr(sae.encoder, name):
                getattr(sae.encoder, name).normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    p = collect(sae, tiny_store, "train")
    ref = []
    with torch.no_grad():
        for b in tiny_store.batches("train", batch_size=8, shuffle=None, epochs=1, drop_last=False):
            ref.append((sae.encode(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT) * b.mask_BT[..., None]).flatten(0, 1))
    ref_NF = torch.cat(ref).numpy()
    pred = sae.encode_parts(*_first_batch(tiny_store))[1]
    assert pred is not None and (pred != 0).any()  # this SAE does predict codes
    got = np.zeros_like(ref_NF)
    got[p.row_M, p.feat_M] = p.code_M
    np.testing.assert_allclose(got, ref_NF, rtol=1e-6, atol=1e-6)


def _first_batch(store):
    b = next(store.batches("train", batch_size=8, shuffle=None, epochs=1, drop_last=False))
    return b.acts_BTD, b.pos_BT, b.mask_BT
