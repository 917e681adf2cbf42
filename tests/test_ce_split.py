"""The CE gap split by position and token frequency (trsae.metrics.split), against per-token cross-entropies
from torch's own ``cross_entropy``, hand-counted classes and the evaluation's pooled CE."""

import math

import pytest
import torch
import torch.nn.functional as F

from trsae import analysis
from trsae.evaluate import evaluate_saes
from trsae.metrics import CleanLogits, ExcessCEAccumulator, frequency_classes, next_token_targets, token_classes
from trsae.metrics.persistence import POSITION_BUCKETS
from trsae.saes import SAEConfig, make_sae


def test_frequency_classes_by_the_share_of_more_frequent_types():
    counts = torch.tensor([5, 30, 50, 10, 0, 5])  # 100 tokens; by count: id 2 (share before it 0), 1 (0.5),
    # 3 (0.8), 0 (0.9), 5 (0.95), 4 (never seen)
    table = frequency_classes(counts)
    assert table.tolist() == [2, 1, 0, 1, 2, 2]  # frequent = 0, middle = 1, rare = 2
    assert token_classes(table, torch.tensor([2, 1, 4, 99])).tolist() == [0, 1, 2, 2]  # an id past the table: rare
    with pytest.raises(ValueError, match="no token"):
        frequency_classes(torch.zeros(3, dtype=torch.long))


def test_per_position_ce_is_torch_cross_entropy_at_the_scored_positions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, 0] = valid[2, 3] = False
    targets, mask = next_token_targets(ids, valid)
    clean, other = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    ref = CleanLogits(clean, targets, mask, chunk_rows=4)  # several chunks
    n, ce, kl, ce_N = ref.stats(other, per_position=True)
    flat = mask.reshape(-1)
    assert ref.rows.tolist() == torch.nonzero(flat).squeeze(-1).tolist()
    want = F.cross_entropy(other.reshape(-1, 11)[flat].double(), targets.reshape(-1)[flat], reduction="none")
    assert ce_N.tolist() == pytest.approx(want.tolist(), rel=1e-6)
    want_clean = F.cross_entropy(clean.reshape(-1, 11)[flat].double(), targets.reshape(-1)[flat], reduction="none")
    assert ref.ce_clean_N.tolist() == pytest.approx(want_clean.tolist(), rel=1e-6)
    assert (n, ce, kl) == pytest.approx(ref.stats(other)) and ce == pytest.approx(float(want.sum()), rel=1e-6)


def test_excess_accumulator_sums_each_split_like_a_loop():
    g = torch.Generator().manual_seed(1)
    ce_sae, ce_clean = torch.rand(200, generator=g) * 3, torch.rand(200, generator=g) * 3
    pos, cls = torch.randint(1, 128, (200,), generator=g), torch.randint(0, 3, (200,), generator=g)
    acc = ExcessCEAccumulator()
    acc.update(ce_sae[:120], ce_clean[:120], pos[:120], cls[:120])  # two batches
    acc.update(ce_sae[120:], ce_clean[120:], pos[120:], cls[120:])
    out = acc.compute()
    for (lo, hi) in POSITION_BUCKETS:
        name = str(lo) if lo == hi else f"{lo}-{hi}"
        sel = [i for i in range(200) if lo <= pos[i] <= hi]
        if sel:
            assert out["by_position"][name]["n"] == len(sel)
            assert out["by_position"][name]["excess"] == pytest.approx(sum(float(ce_sae[i] - ce_clean[i]) for i in sel))
        else:
            assert name not in out["by_position"]
    for j, name in enumerate(("frequent", "middle", "rare")):
        sel = [i for i in range(200) if cls[i] == j]
        assert out["by_frequency"][name]["n"] == len(sel)
        assert out["by_frequency"][name]["excess"] == pytest.approx(sum(float(ce_sae[i] - ce_clean[i]) for i in sel))
    with pytest.raises(ValueError, match="one entry"):
        acc.update(ce_sae, ce_clean[:3], pos, cls)


def test_token_counts_count_the_ordinary_tokens_of_a_split(tiny_store):
    counts = tiny_store.token_counts("train")
    want = torch.zeros_like(counts)
    for b in tiny_store.batches("train", batch_size=1, shuffle=None, epochs=1):
        want += torch.bincount(b.ids_BT[b.mask_BT], minlength=len(counts))[:len(counts)]
    assert torch.equal(counts, want) and counts.sum() > 0
    assert not torch.equal(tiny_store.token_counts("test"), counts)
    with pytest.raises(ValueError, match="split"):
        tiny_store.token_counts("dev")


def test_the_evaluation_splits_the_whole_ce_gap(tiny_store, tiny_model):
    sae = make_sae(SAEConfig.build(tiny_store.d_model, 64, "topk", k=4, input_scale=tiny_store.norm_scale))
    res = evaluate_saes({"s": sae}, tiny_store, tiny_model, max_seqs=3, batch_size=2, density_tokens=64)["s"]
    mp, split = res["model_performance_preservation"], res["ce_excess"]
    n = sum(int(next_token_targets(b.ids_BT, b.mask_BT)[1].sum()) for b in tiny_store.first("test", 3))
    gap = mp["ce_loss_with_sae"] - mp["ce_loss_without_sae"]
    for part in ("by_position", "by_frequency"):
        assert sum(v["n"] for v in split[part].values()) == n
        assert sum(v["excess"] for v in split[part].values()) == pytest.approx(gap * n, rel=1e-6)
    assert evaluate_saes({"s": sae}, tiny_store, max_seqs=3, with_logits=False, density_tokens=64)["s"].get(
        "ce_excess") is None


def test_ce_gap_split_ratios_and_shares_by_hand():
    def res(pos, freq):
        return {"ce_excess": {"by_position": {k: {"excess": e, "n": n} for k, (e, n) in pos.items()},
                              "by_frequency": {k: {"excess": e, "n": n} for k, (e, n) in freq.items()}}}
    runs = {"a": [res({"1": (1.0, 10), "2-3": (3.0, 30)}, {"rare": (2.0, 5), "frequent": (2.0, 35)}),
                  res({"1": (2.0, 10), "2-3": (3.0, 30)}, {"rare": (4.0, 5), "frequent": (1.0, 35)})],
            "b": [res({"1": (2.0, 10), "2-3": (6.0, 30)}, {"rare": (2.0, 5), "frequent": (6.0, 35)}),
                  res({"1": (2.0, 10), "2-3": (6.0, 30)}, {"rare": (4.0, 5), "frequent": (4.0, 35)})]}
    s = analysis.ce_gap_split(runs, "a", "b")
    assert s["by_position"]["1"]["ratio"]["values"] == [0.5, 1.0]
    assert s["by_position"]["2-3"]["ratio"]["mean"] == pytest.approx(0.5)
    assert s["by_position"]["1"]["gap_share"]["mean"] == pytest.approx(0.25)  # 2 of b's 8
    assert s["by_position"]["2-3"]["token_share"]["mean"] == pytest.approx(0.75)
    assert s["by_frequency"]["rare"]["ratio"]["mean"] == pytest.approx(1.0)
    assert s["by_frequency"]["frequent"]["ratio"]["values"] == pytest.approx([1 / 3, 0.25])
    assert list(s["by_position"]) == ["1", "2-3"]
    zero = {"a": [res({"1": (1.0, 1)}, {"rare": (1.0, 1)})], "b": [res({"1": (0.0, 1)}, {"rare": (1.0, 1)})]}
    assert math.isnan(analysis.ce_gap_split(zero, "a", "b")["by_position"]["1"]["ratio"]["mean"] or math.nan)
