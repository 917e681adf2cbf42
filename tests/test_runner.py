"""The result cache is keyed by the configuration and the code: changed ``trsae/`` source never reuses a stored
harvest, run or evaluation."""

import shutil
from pathlib import Path

import pytest
import torch

from trsae import runner
from trsae.config import HarvestConfig, TrainConfig
from trsae.saes import SAEConfig


class _Store:
    manifest = {"config_hash": "0123456789abcdef", "model": "tiny-gpt2"}


def _keys(work):
    return (runner.store_dir(HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=4096), work),
            runner.run_dir(SAEConfig.build(8, 32, "topk", k=4), TrainConfig(tokens=2048), _Store(), work),
            runner.Evaluator(_Store(), split="test", max_seqs=4).path(Path(work) / "run"))


def test_code_version_changes_with_any_source_file(tmp_path):
    src = tmp_path / "trsae"
    shutil.copytree(runner.PACKAGE, src, ignore=shutil.ignore_patterns("__pycache__"))
    before = runner.source_hash(src)
    assert before == runner.source_hash(src) and len(before) == 16
    (src / "report" / "figures.py").write_text((src / "report" / "figures.py").read_text() + "\n# changed\n")
    assert runner.source_hash(src) != before
    changed = runner.source_hash(src)
    (src / "new_module.py").write_text("")
    assert runner.source_hash(src) != changed  # a new file counts too
    assert runner.source_hash(src / "report") != runner.source_hash(src)


def test_every_cache_key_includes_the_code_version(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "code_version", lambda: "a" * 16)
    a = _keys(tmp_path)
    assert a == _keys(tmp_path)  # the same code and configuration: the same folders
    monkeypatch.setattr(runner, "code_version", lambda: "b" * 16)
    b = _keys(tmp_path)
    assert all(x != y for x, y in zip(a, b)), (a, b)
    assert b[0].parent == tmp_path / "stores" and b[1].parent == tmp_path / "runs"


def _counting_evaluator(store, monkeypatch):
    calls = []
    real = runner.evaluate_saes
    monkeypatch.setattr(runner, "evaluate_saes",
                        lambda saes, *a, **k: calls.append(sorted(saes)) or real(saes, *a, **k))
    return runner.Evaluator(store, split="test", max_seqs=2, with_logits=False, density_tokens=64), calls


def test_train_budgets_trains_each_budget_and_evaluates_once(tmp_path, tiny_store, monkeypatch):
    from trsae import analysis
    from trsae.train import read_log

    evaluate, calls = _counting_evaluator(tiny_store, monkeypatch)
    cfg = TrainConfig(tokens=256, batch_size=2, crop_len=32, lr=1e-3, log_every=1)
    specs = {"TopK": SAEConfig.build(tiny_store.d_model, 32, "topk", k=4),
             "TRSAE": SAEConfig.build(tiny_store.d_model, 32, "topk", "trsae", k=4, window=2)}
    epoch = tiny_store.n_tokens("train")
    budgets = analysis.budget_seeds([128, 256, 3 * epoch], 256, [0, 1])  # the largest: three epochs
    per_budget = runner.train_budgets(specs, budgets, cfg, tiny_store, evaluate, tmp_path)
    assert len(calls) == 1 and len(calls[0]) == 2 * (1 + 2 + 2)  # every run in one evaluation
    for tokens, seeds in budgets.items():
        for name, spec in specs.items():
            runs = per_budget[tokens][name]
            assert len(runs) == len(seeds)
            for seed, res in zip(seeds, runs):
                assert res["run"] == str(runner.run_dir(spec, TrainConfig(**{**cfg.__dict__, "tokens": tokens,
                                                                            "seed": seed}), tiny_store, tmp_path))
                assert read_log(res["run"])[-1]["step"] == -(-tokens // 64)  # 64 tokens a step, past the epoch
    # each result carries its FVU on the first training sequences: pooled 1 - EV, here by hand
    from trsae.saes import load_sae

    res = per_budget[3 * epoch]["TRSAE"][1]
    sae = load_sae(Path(res["run"]) / "sae")
    xs, errs = [], []
    with torch.no_grad():
        for b in tiny_store.first("train", runner.RECON_SEQS):
            x_hat = sae.decode(sae.encode(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT))
            xs.append(b.acts_BTD[b.mask_BT].double())
            errs.append((x_hat - b.acts_BTD)[b.mask_BT].double())
    x, err = torch.cat(xs), torch.cat(errs)
    assert res[analysis.TRAIN_FVU] == pytest.approx((err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
                                                    rel=1e-9)
    assert res[analysis.TRAIN_FVU] != per_budget[128]["TRSAE"][0][analysis.TRAIN_FVU]
    # the main budget's runs are the comparison's own: training them again finds them cached
    again = runner.train_and_evaluate(specs, [0, 1], cfg, tiny_store, evaluate, tmp_path)
    assert [r["run"] for r in again["TRSAE"]] == [r["run"] for r in per_budget[256]["TRSAE"]]
    assert len(calls) == 1  # nothing left to evaluate


def test_frontier_evaluates_every_setting_in_one_pass(tmp_path, tiny_store, monkeypatch):
    evaluate, calls = _counting_evaluator(tiny_store, monkeypatch)
    cfg = TrainConfig(tokens=128, batch_size=2, crop_len=32, lr=1e-3)
    base = SAEConfig.build(tiny_store.d_model, 32, "topk", k=4)
    sweep = {"TopK": [base.replace(k=2), base.replace(k=6)], "Top-K-b": [base.replace(k=3)]}
    pts = runner.frontier(sweep, cfg, tiny_store, evaluate, tmp_path, ("sparsity", "l0"))
    assert len(calls) == 1 and len(calls[0]) == 3
    assert [round(p[0]) for p in pts["TopK"]] == [2, 6] and [round(p[0]) for p in pts["Top-K-b"]] == [3]
    assert all(p[0] == p[1] for ps in pts.values() for p in ps)  # the metric asked for (here L0 itself)
