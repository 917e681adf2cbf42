"""`evaluate_saes` against a plain-torch reference: the SAE's reconstruction written into tiny-gpt2's layer
output with a forward hook at ordinary tokens, zeros or the training mean written at EVERY position (BOS
included, as SAELens' ``standard_zero_ablate_hook``), and CE / KL computed by `torch.nn.functional` over the full
logits; several SAEs evaluated together give what each gives alone. The mean comes from an independent loop
over the train split."""

import pytest
import torch
import torch.nn.functional as F

from trsae.evaluate import evaluate_sae, evaluate_saes, train_mean
from trsae.lm import load_model
from trsae.metrics import next_token_targets
from trsae.saes import SAEConfig, make_sae


def _saes(d):
    torch.manual_seed(0)
    topk = make_sae(SAEConfig.build(d, 4 * d, "topk", k=8, seed=1))
    tr = make_sae(SAEConfig.build(d, 4 * d, "topk", "trsae", k=8, window=4, seed=2))
    with torch.no_grad():  # give the temporal terms weight, so a splice that dropped positions would show
        for name, p in tr.named_parameters():
            if p.dim() and name not in ("W_enc", "W_dec", "b_enc", "b_dec"):
                p.add_(0.3 * torch.randn_like(p))
    return {"topk": topk, "trsae": tr}


def _replace_output(replace_BTD):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (replace_BTD(output[0]),) + tuple(output[1:])
        return replace_BTD(output)
    return hook


def _reference(model, store, sae, mean_D, max_seqs, module=None):
    """Σ CE and Σ KL(clean ‖ ·) per variant over the same test sequences, with a plain forward hook on ``module``
    (default the store's block)."""
    module = module or model.hf_layer(store.manifest["layer"])
    sums = {v: [0.0, 0.0] for v in ("clean", "sae", "zero", "mean")}
    n = n_seqs = 0
    for b in store.batches("test", batch_size=4, shuffle=None, epochs=1, drop_last=False):
        if n_seqs >= max_seqs:
            break
        m = b.mask_BT[..., None]
        fills = {"clean": None,
                 "sae": lambda h: torch.where(m, sae.reconstruct(h, pos_BT=b.pos_BT, mask_BT=b.mask_BT), h),
                 "zero": lambda h: torch.zeros_like(h),
                 "mean": lambda h: mean_D.to(h.dtype).expand_as(h).clone()}
        targets, tmask = next_token_targets(b.ids_BT, b.mask_BT)
        logits = {}
        for v, fill in fills.items():
            handle = None if fill is None else module.register_forward_hook(_replace_output(fill))
            try:
                with torch.no_grad():
                    logits[v] = model.hf(b.ids_BT).logits[tmask].double()
            finally:
                if handle is not None:
                    handle.remove()
        logp_clean = F.log_softmax(logits["clean"], -1)
        for v, lg in logits.items():
            sums[v][0] += F.cross_entropy(lg, targets[tmask], reduction="sum").item()
            sums[v][1] += F.kl_div(F.log_softmax(lg, -1), logp_clean, log_target=True, reduction="sum").item()
        n += int(tmask.sum())
        n_seqs += len(b.seq_B)
    return {v: (ce / n, kl / n) for v, (ce, kl) in sums.items()}


def _split_mean(store, split):
    """Mean raw activation over the ordinary tokens of ``split``, written independently of `train_mean`."""
    rows = [b.acts_BTD[b.mask_BT].double() / store.norm_scale
            for b in store.batches(split, batch_size=1, shuffle=None, epochs=1, drop_last=False)]
    return torch.cat(rows).mean(0).float()


def test_spliced_ce_and_kl_match_a_forward_hook_reference(tiny_model, tiny_store):
    saes = _saes(tiny_store.d_model)
    mean_D = _split_mean(tiny_store, "train")
    assert torch.allclose(train_mean(tiny_store), mean_D, rtol=1e-5, atol=1e-6)
    together = evaluate_saes(saes, tiny_store, tiny_model, max_seqs=8)  # the mean-ablation mean: its own
    for name, sae in saes.items():
        ref = _reference(tiny_model, tiny_store, sae, mean_D, max_seqs=8)
        ce = together[name]["model_performance_preservation"]
        kl = together[name]["model_behavior_preservation"]
        assert ce["ce_loss_without_sae"] == pytest.approx(ref["clean"][0], rel=1e-4)
        assert ce["ce_loss_with_sae"] == pytest.approx(ref["sae"][0], rel=1e-4)
        assert ce["ce_loss_with_ablation"] == pytest.approx(ref["zero"][0], rel=1e-4)
        assert kl["kl_div_with_sae"] == pytest.approx(ref["sae"][1], rel=1e-3, abs=1e-5)
        assert kl["kl_div_with_ablation"] == pytest.approx(ref["zero"][1], rel=1e-3, abs=1e-5)
        assert ce["ce_loss_with_mean_ablation"] == pytest.approx(ref["mean"][0], rel=1e-4)
        assert kl["kl_div_with_mean_ablation"] == pytest.approx(ref["mean"][1], rel=1e-3, abs=1e-5)
        assert kl["kl_div_score_mean_ablation"] == pytest.approx(
            (ref["mean"][1] - ref["sae"][1]) / ref["mean"][1], rel=1e-3)
        assert ref["sae"][1] > 1e-3  # a random SAE does change the model: the comparison is not vacuous

        alone = evaluate_sae(sae, tiny_store, tiny_model, max_seqs=8, mean_D=train_mean(tiny_store))
        assert alone["model_performance_preservation"] == pytest.approx(ce, rel=1e-6)
        assert alone["reconstruction_quality"] == pytest.approx(together[name]["reconstruction_quality"], rel=1e-6)


def test_an_attention_output_store_splices_at_the_attention_output(tiny_model, tmp_path):
    """On a store of block 1's attention output, the SAE, zeros and the mean replace what the attention returns (the
    hook on ``h[1].attn``, named here by hand), not the block's output."""
    from trsae.config import HarvestConfig
    from trsae.store import harvest

    cfg = HarvestConfig(model="tiny-gpt2", layer=1, site="attn_out", data="brown", tokens=24 * 32, ctx_len=32,
                        seqs_per_shard=8, batch_size=4, val_frac=0.1, test_frac=0.2)
    store = harvest(cfg, tmp_path / "attn", model=tiny_model, progress=False)
    sae = _saes(store.d_model)["trsae"]
    res = evaluate_sae(sae, store, tiny_model, max_seqs=4)
    ref = _reference(tiny_model, store, sae, _split_mean(store, "train"), 4, module=tiny_model.hf.transformer.h[1].attn)
    ce, kl = res["model_performance_preservation"], res["model_behavior_preservation"]
    assert ce["ce_loss_with_sae"] == pytest.approx(ref["sae"][0], rel=1e-4)
    assert ce["ce_loss_with_ablation"] == pytest.approx(ref["zero"][0], rel=1e-4)
    assert ce["ce_loss_with_mean_ablation"] == pytest.approx(ref["mean"][0], rel=1e-4)
    assert kl["kl_div_with_sae"] == pytest.approx(ref["sae"][1], rel=1e-3, abs=1e-5)
    block = _reference(tiny_model, store, sae, _split_mean(store, "train"), 4)  # the same fills at the block output
    assert abs(block["zero"][0] - ref["zero"][0]) > 3e-4 * ref["zero"][0]  # 3x the tolerance: the sites differ


def test_ablations_replace_bos_and_the_mean_comes_from_train(tiny_model, tiny_store):
    """Keeping BOS clean in the ablations, or taking the mean from the evaluated split, would move CE by more
    than the tolerance of the reference comparison above (so that comparison can tell them apart)."""
    sae = _saes(tiny_store.d_model)["topk"]
    mean_train, mean_test = _split_mean(tiny_store, "train"), _split_mean(tiny_store, "test")
    ref = _reference(tiny_model, tiny_store, sae, mean_train, max_seqs=8)
    wrong_mean = _reference(tiny_model, tiny_store, sae, mean_test, max_seqs=8)
    assert abs(wrong_mean["mean"][0] - ref["mean"][0]) > 3e-4 * ref["mean"][0]  # 3x the rel=1e-4 tolerance
    res = evaluate_sae(sae, tiny_store, tiny_model, max_seqs=8)["model_performance_preservation"]
    assert res["ce_loss_with_mean_ablation"] == pytest.approx(ref["mean"][0], rel=1e-4)
    assert res["ce_loss_with_mean_ablation"] != pytest.approx(wrong_mean["mean"][0], rel=1e-4)


def test_evaluation_reads_the_tokens_test_tokens_names(tiny_store):
    """With a max_seqs that is not a multiple of the batch size, the evaluation still reads exactly the first
    max_seqs test sequences: the tokens `trsae.runner.test_tokens` returns as the evaluation's."""
    from trsae.runner import test_tokens

    sae = make_sae(SAEConfig.build(tiny_store.d_model, 32, "topk", k=4)).eval()
    res = evaluate_saes({"s": sae}, tiny_store, max_seqs=3, batch_size=2, with_logits=False, density_tokens=64)["s"]
    assert res["token_stats"]["n_seqs"] == 3
    assert res["token_stats"]["n_tokens_eval"] == test_tokens(tiny_store, 3).shape[0]


def test_store_only_metrics_read_more_sequences_than_the_lm_metrics(tiny_model, tiny_store):
    """With ``recon_seqs`` beyond ``max_seqs`` the reconstruction, sparsity and persistence metrics are those of the
    first recon_seqs sequences (as an evaluation of that many without the LM gives), and CE / KL stay those of the
    first max_seqs (as an evaluation of max_seqs alone gives). max_seqs is a multiple of the batch size, so that the
    batches are the same (the legacy explained variance averages per batch)."""
    saes = _saes(tiny_store.d_model)
    mean_D = train_mean(tiny_store)
    kw = {"split": "train", "density_tokens": 64}  # the tiny store's test split holds 2 sequences
    both = evaluate_saes(saes, tiny_store, tiny_model, max_seqs=4, mean_D=mean_D, recon_seqs=9, **kw)
    lm = evaluate_saes(saes, tiny_store, tiny_model, max_seqs=4, mean_D=mean_D, **kw)
    store_only = evaluate_saes(saes, tiny_store, max_seqs=9, with_logits=False, **kw)
    for name in saes:
        assert both[name]["model_performance_preservation"] == lm[name]["model_performance_preservation"]
        assert both[name]["model_behavior_preservation"] == lm[name]["model_behavior_preservation"]
        for section in ("reconstruction_quality", "sparsity"):
            assert both[name][section] == pytest.approx(store_only[name][section], rel=1e-9)
            assert both[name][section] != pytest.approx(lm[name][section], rel=1e-9)
        assert both[name]["temporal_codes"] == store_only[name]["temporal_codes"] != lm[name]["temporal_codes"]
        assert both[name]["token_stats"]["n_seqs"] == 4 and both[name]["token_stats"]["n_seqs_recon"] == 9


def test_later_calls_reuse_the_reference_passes_and_give_the_same_numbers(tiny_model, tiny_store, monkeypatch):
    """A second call on the same model, store, tokens and mean runs only its SAEs' spliced passes, and each SAE's
    results equal those of a call that ran every pass itself; another model object or mean runs them again."""
    import trsae.evaluate as ev

    saes = _saes(tiny_store.d_model)
    mean_D = train_mean(tiny_store)
    fresh = {}
    for n in saes:
        ev._last_references.clear()
        fresh[n] = evaluate_saes({n: saes[n]}, tiny_store, tiny_model, max_seqs=8, mean_D=mean_D)[n]
    calls = []
    real = ev.logits_with_replacement
    monkeypatch.setattr(ev, "logits_with_replacement", lambda *a, **kw: calls.append(a[3] if len(a) > 3 else None)
                        or real(*a, **kw))
    ev._last_references.clear()
    first = evaluate_saes({"topk": saes["topk"]}, tiny_store, tiny_model, max_seqs=8, mean_D=mean_D)
    assert len(calls) == 4  # the 4 test sequences in one batch: clean, zero, mean and one spliced pass
    calls.clear()
    second = evaluate_saes({"trsae": saes["trsae"]}, tiny_store, tiny_model, max_seqs=8, mean_D=mean_D)
    assert len(calls) == 1  # the spliced pass only
    assert first["topk"] == fresh["topk"] and second["trsae"] == fresh["trsae"]
    calls.clear()
    evaluate_saes({"topk": saes["topk"]}, tiny_store, tiny_model, max_seqs=8, mean_D=mean_D + 1)
    assert len(calls) == 4
    calls.clear()
    other = load_model("tiny-gpt2", seed=0)  # the same weights in another object (tests may edit a model's weights)
    evaluate_saes({"topk": saes["topk"]}, tiny_store, other, max_seqs=8, mean_D=mean_D)
    assert len(calls) == 4
