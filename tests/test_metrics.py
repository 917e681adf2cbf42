"""Core metrics against hand computations and independent naive references (plain Python / numpy)."""

import ast
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trsae import metrics as M
from trsae.io import write_json_atomic

# ---------------------------------------------------------------------------------------------------------
# independent references


def naive_recon(batches):
    """Per-token Python reference. ``batches``: list of (x [n, d], x_hat [n, d], codes [n, f]) numpy arrays
    holding only valid tokens. Legacy EV centres each batch on its own mean."""
    xs = np.concatenate([b[0] for b in batches]).astype(np.float64)
    xhs = np.concatenate([b[1] for b in batches]).astype(np.float64)
    cs = np.concatenate([b[2] for b in batches]).astype(np.float64)
    n, d = xs.shape
    resid = ((xs - xhs) ** 2).sum()
    total = ((xs - xs.mean(axis=0)) ** 2).sum()
    legacy = []
    for x, xh, _ in batches:
        x, xh = x.astype(np.float64), xh.astype(np.float64)
        mu = x.mean(axis=0)
        for i in range(len(x)):
            legacy.append(1 - ((x[i] - xh[i]) ** 2).sum() / ((x[i] - mu) ** 2).sum())
    cos, ratio = [], []
    for x, xh in zip(xs, xhs):
        nx, nxh = math.sqrt((x * x).sum()), math.sqrt((xh * xh).sum())
        cos.append(0.0 if nx * nxh == 0 else (x * xh).sum() / (nx * nxh))
        ratio.append(nxh / (nx if nx >= 1e-4 else 1.0))
    return {
        "explained_variance": 1 - resid / total,
        "explained_variance_legacy": float(np.mean(legacy)),
        "mse": resid / (n * d),
        "sse_per_token": resid / n,
        "cossim": float(np.mean(cos)),
        "l2_norm_in": float(np.linalg.norm(xs, axis=1).mean()),
        "l2_norm_out": float(np.linalg.norm(xhs, axis=1).mean()),
        "l2_ratio": float(np.mean(ratio)),
        "relative_reconstruction_bias": (xhs * xhs).sum() / (xs * xhs).sum(),
        "l0": float((cs != 0).sum(axis=1).mean()),
        "l1": float(np.abs(cs).sum(axis=1).mean()),
    }


def assert_close_dict(got, want, rel=1e-9, abs_=1e-12):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=abs_), k


def np_kl(p_logits, q_logits):
    p = np.exp(p_logits - p_logits.max()); p /= p.sum()
    q = np.exp(q_logits - q_logits.max()); q /= q.sum()
    return float((p * (np.log(p) - np.log(q))).sum())


# ---------------------------------------------------------------------------------------------------------
# reconstruction


def test_package_is_pure():
    """The metrics import nothing of trsae but each other (no model, data, store or SAE layer)."""
    for f in Path(M.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                assert node.level == 0 and (not mod.startswith("trsae") or mod.startswith("trsae.metrics")), f.name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("trsae") for a in node.names)


def test_identity_reconstruction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g) + 3.0
    codes = torch.relu(torch.randn(2, 5, 6, generator=g))
    acc = M.ReconstructionAccumulator()
    acc.update(x, x.clone(), codes)
    r = acc.compute()
    assert r["explained_variance"] == pytest.approx(1.0)
    assert r["explained_variance_legacy"] == pytest.approx(1.0)
    assert r["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert r["mse"] == pytest.approx(0.0, abs=1e-12)
    assert r["cossim"] == pytest.approx(1.0)
    assert r["l2_ratio"] == pytest.approx(1.0)
    assert r["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert r["n_tokens"] == 10


def test_zero_reconstruction_zero_mean_by_hand():
    # 2 x 2 tokens, d = 2, mean exactly 0: pooled EV = 1 - Σ‖x‖² / Σ‖x‖² = 0
    x = torch.tensor([[[1.0, 2.0], [-1.0, 0.0]], [[3.0, -2.0], [-3.0, 0.0]]])
    acc = M.ReconstructionAccumulator()
    acc.update(x, torch.zeros_like(x), torch.zeros(2, 2, 3))
    r = acc.compute()
    assert r["explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert r["fvu"] == pytest.approx(1.0)
    assert r["mse"] == pytest.approx(28 / 8)  # (5 + 1 + 13 + 9) / (4 tokens * 2 dims)
    assert r["sse_per_token"] == pytest.approx(28 / 4)
    assert r["cossim"] == 0.0  # zero vector -> 0 by convention
    assert r["l2_norm_out"] == 0.0 and r["l2_ratio"] == 0.0
    assert r["l2_norm_in"] == pytest.approx((math.sqrt(5) + 1 + math.sqrt(13) + 3) / 4)
    assert r["relative_reconstruction_bias"] is None  # 0 / 0
    assert r["l0"] == 0.0 and r["l1"] == 0.0


def test_hand_case_all_metrics():
    # tokens x = (0,0), (1,0), (5,0); mean (2,0); centred ‖·‖² = 4, 1, 9 (Σ 14)
    # x_hat = (1,0), (1,0), (4,0); residuals 1, 0, 1 (Σ 2)
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [100.0, -7.0]]])
    xh = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [4.0, 0.0], [-50.0, 2.0]]])
    codes = torch.tensor([[[0.0, 2.0, -1.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[True, True, True, False]])
    acc = M.ReconstructionAccumulator()
    acc.update(x, xh, codes, mask)
    r = acc.compute()
    want = {
        "explained_variance": 1 - 2 / 14,
        "explained_variance_legacy": (1 - 1 / 4 + 1 + 1 - 1 / 9) / 3,
        "fvu": 2 / 14,
        "mse": 2 / 6,
        "sse_per_token": 2 / 3,
        "cossim": 2 / 3,  # token 1 has x = 0 -> 0
        "l2_norm_in": 2.0,
        "l2_norm_out": 2.0,
        "l2_ratio": (1 + 1 + 0.8) / 3,  # token 1: ‖x‖ < 1e-4 -> divide by 1
        "relative_reconstruction_bias": 18 / 21,
        "l0": 1.0,
        "l1": 2.0,
    }
    assert_close_dict(r, want)
    assert r["n_tokens"] == 3


def test_streaming_equals_one_shot_and_naive_reference():
    g = torch.Generator().manual_seed(1)
    # a large common offset (like a residual stream's mean direction) to stress the variance sums
    xs = [torch.randn(2, 7, 16, generator=g) + 500.0 for _ in range(3)]
    xhs = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xs]
    cs = [torch.relu(torch.randn(2, 7, 32, generator=g) - 1.0) for _ in range(3)]
    ms = [torch.rand(2, 7, generator=g) > 0.2 for _ in range(3)]

    streamed = M.ReconstructionAccumulator()
    for x, xh, c, m in zip(xs, xhs, cs, ms):
        streamed.update(x, xh, c, m)
    rs = streamed.compute()

    one = M.ReconstructionAccumulator()
    one.update(torch.cat(xs), torch.cat(xhs), torch.cat(cs), torch.cat(ms))
    r1 = one.compute()
    for k in ["explained_variance", "mse", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio",
              "relative_reconstruction_bias", "l0", "l1", "n_tokens"]:
        assert rs[k] == pytest.approx(r1[k], rel=1e-9), k
    assert rs["n_batches"] == 3 and r1["n_batches"] == 1

    ref_batches = [(x[m].double().numpy(), xh[m].double().numpy(), c[m].numpy())
                   for x, xh, c, m in zip(xs, xhs, cs, ms)]
    assert_close_dict(rs, naive_recon(ref_batches), rel=1e-7)
    # the legacy form depends on batching: one-shot equals the one-batch reference
    ref_one = naive_recon([tuple(np.concatenate(z) for z in zip(*ref_batches))])
    assert r1["explained_variance_legacy"] == pytest.approx(ref_one["explained_variance_legacy"], rel=1e-7)
    assert 0.0 < rs["explained_variance"] < 1.0


def test_masked_tokens_do_not_count():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 8, generator=g)
    xh = x + torch.randn(x.shape, generator=g)
    c = torch.relu(torch.randn(3, 6, 10, generator=g))
    mask = torch.rand(3, 6, generator=g) > 0.4
    a = M.ReconstructionAccumulator(); a.update(x, xh, c, mask)
    x2, xh2, c2 = x.clone(), xh.clone(), c.clone()
    x2[~mask] = 1e6; xh2[~mask] = -3.0; c2[~mask] = 7.0
    b = M.ReconstructionAccumulator(); b.update(x2, xh2, c2, mask)
    ra, rb = a.compute(), b.compute()
    assert ra == rb
    # and equals evaluating only the valid tokens, flattened to [N, D]
    s = M.ReconstructionAccumulator(); s.update(x[mask], xh[mask], c[mask])
    assert_close_dict(s.compute(), {k: v for k, v in ra.items() if k != "n_batches"}, rel=1e-12)


def test_empty_and_shape_errors():
    acc = M.ReconstructionAccumulator()
    assert acc.compute()["explained_variance"] is None
    with pytest.raises(ValueError):
        acc.update(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError):
        acc.update(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), None, torch.ones(2, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------
# feature statistics


def test_feature_stats_by_hand():
    codes = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]],
                          [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, True, False]])  # latent 2 fires only where masked
    fs = M.FeatureStatsAccumulator(4)
    fs.update(codes[:1], mask[:1])
    fs.update(codes[1:], mask[1:])
    torch.testing.assert_close(fs.density_F(), torch.tensor([1.0, 0.25, 0.0, 0.25], dtype=torch.float64))
    r = fs.compute()
    assert r["n_tokens"] == 4
    assert r["dead_frac"] == 0.25
    assert r["dense_frac"] == 0.75 and r["freq_over_10_percent"] == 0.75
    assert r["frac_alive"] == 0.75 and r["freq_over_1_percent"] == 0.75
    fs_hi = M.FeatureStatsAccumulator(4, dense_threshold=0.5)
    fs_hi.update(codes, mask)
    assert fs_hi.compute()["dense_frac"] == 0.25
    torch.testing.assert_close(fs.mean_act_when_active_F(),
                               torch.tensor([1.0, 0.5, 0.0, -1.0], dtype=torch.float64))
    h = M.log10_density_histogram(fs.density_F(), bins=8, lo=-8, hi=0)
    assert h["n_dead"] == 1 and h["n_total"] == 4 and sum(h["counts"]) == 3
    assert h["counts"][-1] == 3  # log10(1) = 0 and log10(0.25) = -0.6 both in [-1, 0]
    with pytest.raises(ValueError):
        fs.update(torch.zeros(1, 1, 5))


# ---------------------------------------------------------------------------------------------------------
# logits: CE and KL


def _logit_case(seed=3, B=2, T=5, V=11):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(B, T, V, generator=g) * 2
    sae = clean + 0.5 * torch.randn(B, T, V, generator=g)
    zero = torch.randn(B, T, V, generator=g) * 2
    mean = clean + 1.5 * torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 0] = False  # BOS
    valid[1, -1] = False  # padding
    targets, mask = M.next_token_targets(tokens, valid)
    return clean, sae, zero, mean, targets, mask


def test_next_token_targets():
    tokens = torch.tensor([[5, 6, 7, 8]])
    targets, mask = M.next_token_targets(tokens, torch.tensor([[False, True, True, False]]))
    assert targets.tolist() == [[6, 7, 8, 0]]
    assert mask.tolist() == [[False, True, False, False]]


def test_ce_kl_against_references():
    clean, sae, zero, mean, targets, mask = _logit_case()
    acc = M.LogitAccumulator(chunk_rows=3)
    acc.update(clean, sae, zero, mean, targets, mask)
    r = acc.compute()
    ce = {name: F.cross_entropy(lg[mask], targets[mask]).item()
          for name, lg in dict(clean=clean, sae=sae, zero=zero, mean=mean).items()}
    assert r["n_positions"] == int(mask.sum())
    assert r["ce_loss_without_sae"] == pytest.approx(ce["clean"], rel=1e-5)
    assert r["ce_loss_with_sae"] == pytest.approx(ce["sae"], rel=1e-5)
    assert r["ce_loss_with_ablation"] == pytest.approx(ce["zero"], rel=1e-5)
    assert r["ce_loss_with_mean_ablation"] == pytest.approx(ce["mean"], rel=1e-5)
    assert r["ce_loss_score"] == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), rel=1e-4)
    assert r["ce_loss_score_mean_ablation"] == pytest.approx(
        (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"]), rel=1e-4)
    rows = mask.nonzero().tolist()
    kl = {name: np.mean([np_kl(clean[b, t].double().numpy(), lg[b, t].double().numpy()) for b, t in rows])
          for name, lg in dict(sae=sae, zero=zero, mean=mean).items()}
    assert r["kl_div_with_sae"] == pytest.approx(kl["sae"], rel=1e-4)
    assert r["kl_div_with_ablation"] == pytest.approx(kl["zero"], rel=1e-4)
    assert r["kl_div_with_mean_ablation"] == pytest.approx(kl["mean"], rel=1e-4)
    assert r["kl_div_score"] == pytest.approx((kl["zero"] - kl["sae"]) / kl["zero"], rel=1e-4)
    assert r["kl_div_score_mean_ablation"] == pytest.approx((kl["mean"] - kl["sae"]) / kl["mean"], rel=1e-4)


def test_kl_by_hand():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3)
    clean = torch.zeros(1, 1, 2)
    other = torch.tensor([[[0.0, math.log(3.0)]]])
    acc = M.LogitAccumulator()
    acc.update(clean, other, None, None, torch.tensor([[1]]), torch.tensor([[True]]))
    r = acc.compute()
    assert r["kl_div_with_sae"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert r["ce_loss_with_sae"] == pytest.approx(-math.log(0.75), rel=1e-6)
    assert r["ce_loss_without_sae"] == pytest.approx(math.log(2), rel=1e-6)
    assert r["kl_div_score"] is None and r["ce_loss_with_ablation"] is None


def test_scores_identity_and_ablation():
    clean, sae, zero, mean, targets, mask = _logit_case(seed=4)
    perfect = M.LogitAccumulator()
    perfect.update(clean, clean.clone(), zero, mean, targets, mask)
    r = perfect.compute()
    assert r["ce_loss_score"] == pytest.approx(1.0) and r["kl_div_score"] == pytest.approx(1.0)
    assert r["ce_loss_score_mean_ablation"] == pytest.approx(1.0)
    assert r["kl_div_score_mean_ablation"] == pytest.approx(1.0)
    assert r["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    useless = M.LogitAccumulator()
    useless.update(clean, zero.clone(), zero, mean, targets, mask)
    r = useless.compute()
    assert r["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert r["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


def test_logits_streaming_masking_and_separate_variants():
    clean, sae, zero, mean, targets, mask = _logit_case(seed=5, B=3, T=6)
    together = M.LogitAccumulator(chunk_rows=1000)
    for b in range(3):
        together.update(clean[b:b + 1], sae[b:b + 1], zero[b:b + 1], mean[b:b + 1], targets[b:b + 1], mask[b:b + 1])
    one_shot = M.LogitAccumulator(chunk_rows=2)
    one_shot.update(clean, sae, zero, mean, targets, mask)
    separate = M.LogitAccumulator(chunk_rows=4)
    separate.update(clean, sae, None, None, targets, mask)
    separate.update(clean, None, zero, None, targets, mask)
    separate.update(clean, None, None, mean, targets, mask)
    junk = [t.clone() for t in (clean, sae, zero, mean)]
    for t in junk:
        t[~mask] = 1e4 * torch.randn(t[~mask].shape)
    masked = M.LogitAccumulator()
    masked.update(*junk, targets, mask)
    ref = one_shot.compute()
    for other in (together, separate, masked):
        got = other.compute()
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, rel=1e-5), k


# ---------------------------------------------------------------------------------------------------------
# results assembly, seeds, JSON


def _core(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, generator=g)
    codes = torch.relu(torch.randn(2, 4, 12, generator=g))
    rec = M.ReconstructionAccumulator(); rec.update(x, x + 0.1 * torch.randn(x.shape, generator=g), codes)
    fs = M.FeatureStatsAccumulator(12); fs.update(codes)
    clean, sae, zero, mean, targets, mask = _logit_case(seed)
    lg = M.LogitAccumulator(); lg.update(clean, sae, zero, mean, targets, mask)
    return M.core_results(rec.compute(), lg.compute(), fs.compute(), config={"arch": "topk", "seed": seed})


def test_core_results_shape():
    r = _core(0)
    assert set(r) == {"model_behavior_preservation", "model_performance_preservation", "reconstruction_quality",
                      "shrinkage", "sparsity", "misc_metrics", "token_stats", "config"}
    assert {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae",
            "kl_div_score_mean_ablation"} <= set(r["model_behavior_preservation"])
    assert {"ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae",
            "ce_loss_score_mean_ablation", "ce_loss_with_mean_ablation"} <= set(r["model_performance_preservation"])
    assert {"explained_variance", "explained_variance_legacy", "mse", "cossim", "fvu"} <= set(r["reconstruction_quality"])
    assert set(r["shrinkage"]) == {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"}
    assert set(r["sparsity"]) == {"l0", "l1", "dead_frac", "dense_frac", "n_tokens_density"}
    q = r["reconstruction_quality"]
    assert q["fvu"] == pytest.approx(1 - q["explained_variance"])
    assert r["token_stats"]["total_tokens_eval_sparsity_variance"] == 8
    assert r["config"] == {"arch": "topk", "seed": 0}
    no_logits = M.core_results({**_recon_dict()}, None, None)
    assert "model_behavior_preservation" not in no_logits and "dead_frac" not in no_logits["sparsity"]
    assert "l0_train_mode" not in r["sparsity"]
    tm = M.core_results(_recon_dict(), None, None, train_mode={"l0": 32.0, "explained_variance": 0.5})
    assert tm["sparsity"]["l0_train_mode"] == 32.0
    assert tm["reconstruction_quality"]["explained_variance_train_mode"] == 0.5


def _recon_dict():
    acc = M.ReconstructionAccumulator()
    acc.update(torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(1, 2, 4))
    return acc.compute()


def test_aggregate_seeds_against_numpy():
    runs = [_core(s) for s in range(3)]
    agg = M.aggregate_seeds(runs)
    for section, key in [("reconstruction_quality", "explained_variance"), ("sparsity", "l0"),
                         ("model_performance_preservation", "ce_loss_score"), ("shrinkage", "l2_ratio")]:
        vals = np.array([r[section][key] for r in runs])
        leaf = agg[section][key]
        assert leaf["n"] == 3
        assert leaf["values"] == pytest.approx(vals.tolist())
        assert leaf["mean"] == pytest.approx(vals.mean())
        assert leaf["se"] == pytest.approx(vals.std(ddof=1) / np.sqrt(3))
    assert agg["config"]["arch"] == "topk"  # equal -> kept as is
    assert agg["config"]["seed"] == [0, 1, 2]  # config is never averaged; differing -> list
    one = M.aggregate_seeds(runs[:1])
    assert one["sparsity"]["l0"]["se"] == 0.0 and one["sparsity"]["l0"]["n"] == 1


def test_aggregate_seeds_edge_leaves():
    a = {"s": {"v": 1.0, "u": None, "name": "x", "tag": "a", "w": float("nan")}}
    b = {"s": {"v": 3.0, "u": None, "name": "x", "tag": "b", "w": 2.0}, "extra": {"z": 5}}
    agg = M.aggregate_seeds([a, b])
    assert agg["s"]["v"]["mean"] == 2.0 and agg["s"]["v"]["se"] == pytest.approx(1.0)
    assert agg["s"]["u"] is None
    assert agg["s"]["name"] == "x" and agg["s"]["tag"] == ["a", "b"]
    assert agg["s"]["w"] == {"mean": 2.0, "se": 0.0, "n": 1, "values": [2.0]}
    assert agg["extra"]["z"]["n"] == 1
    with pytest.raises(ValueError):
        M.aggregate_seeds([])


def test_write_json_atomic(tmp_path):
    """Results JSON (`trsae.io.write_json_atomic`) from the values the metrics produce."""
    obj = {"a": torch.tensor([1.5, 2.0]), "b": np.float32(0.25), "c": float("nan"), "d": (1, np.int64(2)),
           "p": tmp_path, "e": np.bool_(True), "f": torch.tensor(float("inf")), "g": np.array([[1, 2]])}
    path = write_json_atomic(tmp_path / "sub" / "r.json", obj)
    back = json.loads(path.read_text())
    assert back == {"a": [1.5, 2.0], "b": 0.25, "c": None, "d": [1, 2], "p": str(tmp_path), "e": True, "f": None,
                    "g": [[1, 2]]}
    assert path.read_text().startswith('{\n  "a": [\n    1.5,')  # indent 2, keys in insertion order
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left
    umask = os.umask(0); os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    write_json_atomic(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
