"""Seed-paired comparisons and the claims built on them: a ratio computed seed by seed, and no winner named where
two-standard-error intervals overlap."""

import math

import pytest

from trsae import analysis, report


def _res(ev, ce):
    return {"reconstruction_quality": {"explained_variance": ev}, "model_performance_preservation": {"ce_loss_score": ce}}


def test_paired_ratios_are_taken_seed_by_seed():
    per_seed = {"a": [_res(0.9, 0.95), _res(0.8, 0.90)], "b": [_res(0.8, 0.90), _res(0.6, 0.80)]}
    p = analysis.paired(per_seed, "a", "b")["paired"]
    assert p["fvu_ratio"]["values"] == pytest.approx([0.5, 0.5]) and p["fvu_ratio"]["se"] == pytest.approx(0)
    assert p["ce_gap_ratio"]["mean"] == pytest.approx(0.5)  # (0.05/0.1 + 0.1/0.2) / 2
    assert p["d_ev"]["mean"] == pytest.approx(0.15) and p["d_ev"]["n"] == 2
    with pytest.raises(ValueError):  # seeds must pair up
        analysis.paired({"a": per_seed["a"], "b": per_seed["b"][:1]}, "a", "b")


def test_separated_needs_two_seeds_and_disjoint_intervals():
    leaf = lambda m, se, n=3: {"mean": m, "se": se, "n": n}  # noqa: E731
    assert analysis.separated(leaf(1.0, 0.1)) and not analysis.separated(leaf(1.0, 0.6))
    assert not analysis.separated(leaf(1.0, 0.0, n=1))  # one seed: no error bar, no claim
    assert analysis.separated(leaf(1.0, 0.1), leaf(0.0, 0.1)) and not analysis.separated(leaf(1.0, 0.3), leaf(0.0, 0.3))


def _ablation_run(ev_by_name):
    per_seed = {n: [_res(ev, 0.9) for ev in evs] for n, evs in ev_by_name.items()}
    summary = analysis.summarize(per_seed)
    effects = analysis.ablation_effects(per_seed, ("no position emb.", "w=0", "gates fixed open", "no curriculum"))
    claims = analysis.ablation_claims(per_seed, effects, [0, 4, 16], 16)
    return report.ablation_macros(summary, claims, [0, 4, 16], 3, 1000, 4)


def test_ablation_claims_a_largest_effect_only_when_it_is_separated():
    full = [0.80, 0.81, 0.82]
    base = {"full": full, "look-ahead (reference)": [0.9, 0.9, 0.9], "w=4": [0.79, 0.80, 0.81]}
    clear = _ablation_run({**base, "no position emb.": [0.80, 0.81, 0.82], "w=0": [0.70, 0.71, 0.72],
                           "gates fixed open": [0.795, 0.805, 0.815], "no curriculum": [0.80, 0.81, 0.819]})
    assert clear["ablLargestEffect"].startswith("removing the context attention (w = 0)")
    assert float(clear["ablDeltaEvWZero"]) == pytest.approx(0.1)
    assert clear["ablSeparatedFromZero"] == ("the context attention (w = 0), "
                                             "the gates (fixed open, without their penalty)")
    assert clear["ablBestWindow"] == "$w=16$"  # the full model's window beats w = 4 on every seed
    noisy = _ablation_run({**base, "no position emb.": [0.70, 0.85, 0.80], "w=0": [0.72, 0.80, 0.83],
                           "gates fixed open": full, "no curriculum": full})
    assert noisy["ablLargestEffect"].startswith("none singled out")
    tied = _ablation_run({**base, "w=4": [0.82, 0.80, 0.815], "no position emb.": full, "w=0": full,
                          "gates fixed open": full, "no curriculum": full})
    assert tied["ablBestWindow"].startswith("no window beats the next best")


def test_amortisation_gap_closed_is_paired_by_seed():
    from trsae.analysis import amortisation

    def r(enc, pur):
        return {"fvu_encoder": enc, "fvu_pursuit": pur, "pursuit_ratio": pur / enc}
    ceil = {"TopK": [r(0.20, 0.10), r(0.30, 0.20)], "TRSAE": [r(0.15, 0.08), r(0.28, 0.15)],
            "BatchTopK": [r(0.25, 0.2)]}
    per_sae, closed = amortisation(ceil, {"TRSAE": "TopK", "TRSAE-BatchTopK": "BatchTopK"})
    assert set(closed) == {"TRSAE"}  # a twin without its TRSAE is left out
    c = closed["TRSAE"]["ceiling"]
    # seed 0: gain 0.05 of a 0.10 gap; seed 1: gain 0.02 of a 0.10 gap
    assert c["gap_closed"]["values"] == pytest.approx([0.5, 0.2])
    assert c["gap_closed"]["mean"] == pytest.approx(0.35) and c["gap_closed"]["se"] == pytest.approx(0.15)
    assert c["amortisation_gap"]["mean"] == pytest.approx(0.10)
    assert per_sae["TopK"]["ceiling"]["pursuit_ratio"]["mean"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_by_position_reads_each_bucket_in_order():
    from trsae.analysis import by_position

    leaf = lambda m: {"mean": m, "se": 0.01, "n": 2}  # noqa: E731
    summary = {"TopK": {"temporal_codes": {"by_position": {"4-7": {"persistence": leaf(0.3)},
                                                           "1": {"persistence": leaf(0.1)},
                                                           "2-3": {"persistence": leaf(0.2)}}}},
               "ReLU": {"sparsity": {}}}
    assert by_position(summary, "persistence") == {"TopK": [(1.0, 0.1, 0.01), (2.0, 0.2, 0.01), (4.0, 0.3, 0.01)]}


def test_budget_seeds_every_seed_at_the_two_largest_and_the_main_budget():
    got = analysis.budget_seeds([1200, 75, 300, 150, 600], 150, [0, 1])
    assert list(got) == [75, 150, 300, 600, 1200]
    assert got == {75: [0], 150: [0, 1], 300: [0], 600: [0, 1], 1200: [0, 1]}
    assert analysis.budget_seeds([300, 75], 300, [0, 1]) == {75: [0, 1], 300: [0, 1]}
    with pytest.raises(ValueError):
        analysis.budget_seeds([0, 100], 100, [0])
    with pytest.raises(ValueError, match="main one"):
        analysis.budget_seeds([75, 150], 300, [0, 1])


def test_training_length_rows_against_hand_computed_values():
    per_budget = {300_000: {"a": [_res(0.90, 0.95), _res(0.80, 0.90)], "b": [_res(0.80, 0.90), _res(0.60, 0.80)]},
                  75_000: {"a": [_res(0.5, 0.6)], "b": [_res(0.0, 0.2)]}}
    table = analysis.training_length(per_budget, "a", "b")
    assert list(table) == [75_000, 300_000]
    assert list(report.by_budget(table)) == ["75k tokens", "300k tokens"]
    assert report.budget_label(1_200_000) == "1.2M tokens"
    v = table[300_000]["versus"]
    assert v["fvu_a"]["values"] == pytest.approx([0.1, 0.2]) and v["fvu_b"]["mean"] == pytest.approx(0.3)
    assert v["ce_b"]["values"] == pytest.approx([0.9, 0.8])
    assert table[75_000]["paired"]["fvu_ratio"]["mean"] == pytest.approx(0.5)  # 0.5 / 1.0
    assert table[75_000]["paired"]["ce_gap_ratio"]["mean"] == pytest.approx(0.5)  # 0.4 / 0.8
    # both seeds halve the FVU: apart from 1; one seed never is; ratios 0.5 and 1.4 straddle 1
    assert table[300_000]["apart_from_one"] == {"fvu_ratio": True, "ce_gap_ratio": True}
    assert not any(table[75_000]["apart_from_one"].values())
    mixed = {"a": [_res(0.95, 0.9), _res(0.44, 0.9)], "b": [_res(0.9, 0.9), _res(0.6, 0.9)]}
    assert not analysis.versus(mixed, "a", "b")["apart_from_one"]["fvu_ratio"]
    assert "train_fvu_a" not in analysis.versus(mixed, "a", "b")["versus"]
    for side, fvus in (("a", (0.04, 0.5)), ("b", (0.06, 0.3))):  # results that carry a train-split FVU
        for res, fvu in zip(mixed[side], fvus):
            res[analysis.TRAIN_FVU] = fvu
    v = analysis.versus(mixed, "a", "b")["versus"]
    assert v["train_fvu_a"]["values"] == [0.04, 0.5] and v["train_fvu_b"]["mean"] == pytest.approx(0.18)


def test_length_trend_is_paired_by_seed_and_names_no_move_within_noise():
    runs = lambda pairs: {"a": [_res(1 - fa, 0.9) for fa, _ in pairs], "b": [_res(1 - fb, 0.9) for _, fb in pairs]}  # noqa: E731
    # FVU ratios 0.90, 0.92 at the main budget; 0.97, 0.99 at the largest: +0.07 on both seeds, toward 1
    per_budget = {300: runs([(0.09, 0.1), (0.092, 0.1)]), 1200: runs([(0.097, 0.1), (0.099, 0.1)])}
    t = analysis.length_trend(per_budget, "a", "b", 300)
    assert t["change"]["mean"] == pytest.approx(0.07) and t["change"]["se"] == pytest.approx(0, abs=1e-12)
    assert t["toward_one"] and t["separated"] and t["largest"] == 1200
    assert report.macros._trend_words(t).startswith("moves toward 1")
    noisy = {300: runs([(0.09, 0.1), (0.092, 0.1)]), 1200: runs([(0.08, 0.1), (0.1, 0.1)])}  # -0.01, +0.008
    t = analysis.length_trend(noisy, "a", "b", 300)
    assert not t["separated"] and report.macros._trend_words(t).startswith("does not move")
    with pytest.raises(ValueError):  # the two budgets must share their seeds
        analysis.length_trend({300: runs([(0.09, 0.1)]), 1200: per_budget[1200]}, "a", "b", 300)


def test_length_trend_last_reads_the_step_from_the_second_largest_budget():
    runs = lambda pairs: {"a": [_res(1 - fa, 0.9) for fa, _ in pairs], "b": [_res(1 - fb, 0.9) for _, fb in pairs]}  # noqa: E731
    per_budget = {300: runs([(0.05, 0.1), (0.06, 0.1)]), 600: runs([(0.09, 0.1), (0.092, 0.1)]),
                  1200: runs([(0.097, 0.1), (0.099, 0.1)])}
    t = analysis.length_trend_last(per_budget, "a", "b")
    assert (t["previous"], t["largest"]) == (600, 1200)
    assert t["change"]["mean"] == pytest.approx(0.07) and t["separated"] and t["toward_one"]
    with pytest.raises(ValueError, match="two budgets"):
        analysis.length_trend_last({1200: per_budget[1200]}, "a", "b")


def test_length_fit_recovers_a_power_law_with_an_offset():
    ts = [150e3, 300e3, 600e3, 1.2e6, 2.4e6, 4.8e6]
    fvu = [0.04 + 0.02 * (t / 4.8e6) ** -0.6 for t in ts]  # the closed form the fit must find
    fit = analysis.length_fit(list(zip(ts, fvu)))
    assert (fit["a"]["mean"], fit["b"]["mean"], fit["c"]["mean"]) == pytest.approx((0.02, 0.6, 0.04), rel=1e-5)
    assert fit["rms"] < 1e-9 and fit["t_ref"] == 4.8e6 and fit["n"] == 6
    noisy = analysis.length_fit([(t, y * (1 + e)) for t, y, e in zip(ts, fvu, [0.01, -0.01, 0.02, -0.02, 0.01, 0])])
    assert noisy["c"]["se"] > 0 and abs(noisy["c"]["mean"] - 0.04) < 0.01
    curve = analysis.fit_curve(fit, ts, n=3)
    assert [x for x, _ in curve] == pytest.approx([150e3, (150e3 * 4.8e6) ** 0.5, 4.8e6])
    assert curve[-1][1] == pytest.approx(0.06, rel=1e-5)
    with pytest.raises(ValueError, match="at least 4"):
        analysis.length_fit(list(zip(ts[:3], fvu[:3])))


def test_length_fits_and_the_asymptote_ratio_with_its_delta_method_error():
    ts = [150e3, 300e3, 600e3, 1.2e6]
    table = {t: {"versus": {"fvu_a": {"mean": 0.03 + 0.02 * (t / 1.2e6) ** -0.5},
                            "fvu_b": {"mean": 0.04 + 0.02 * (t / 1.2e6) ** -0.5}}} for t in ts}
    fits = analysis.length_fits(table)
    assert fits["ratio"]["mean"] == pytest.approx(0.75, rel=1e-4)
    assert analysis.length_fits({t: table[t] for t in ts[:3]}) is None
    r = analysis.asymptote_ratio({"c": {"mean": 0.03, "se": 0.003}}, {"c": {"mean": 0.04, "se": 0.002}})
    # ratio 0.75; relative errors 0.1 and 0.05 add in quadrature
    assert r["mean"] == pytest.approx(0.75) and r["se"] == pytest.approx(0.75 * (0.1 ** 2 + 0.05 ** 2) ** 0.5)
    assert math.isnan(analysis.asymptote_ratio({"c": {"mean": 0.03, "se": 0}}, {"c": {"mean": 0.0, "se": 0}})["mean"])


def test_variance_concentration_closed_form():
    import torch

    x = torch.zeros(200, 4)
    x[0, 2] = 10.0  # one token far out along one dimension: mean 0.05, centred sq. 9.95^2 + 199 * 0.05^2
    got = analysis.variance_concentration(x, top_frac=0.01)  # the top 1% of 200 tokens: 2 tokens
    total = 9.95 ** 2 + 199 * 0.05 ** 2
    assert got["top_token_share"] == pytest.approx((9.95 ** 2 + 0.05 ** 2) / total)
    assert got["top_dim_share"] == pytest.approx(1.0)
    spread = analysis.variance_concentration(torch.eye(4).repeat(50, 1), top_frac=0.01)
    assert spread["top_dim_share"] == pytest.approx(0.25) and spread["top_token_share"] == pytest.approx(2 / 200)


def test_field_versus_ratios_and_gap_share_by_hand():
    runs = {"best": [_res(0.8, 0.90), _res(0.6, 0.80)], "x": [_res(0.84, 0.95), _res(0.68, 0.84)]}
    # TopK's pursuit pass: its encoder FVU and the pursuit's on its dictionary, seed by seed
    ceil = {"TopK": [{"fvu_encoder": 0.2, "fvu_pursuit": 0.1}, {"fvu_encoder": 0.4, "fvu_pursuit": 0.2}]}
    out = analysis.field_versus(runs, ["x"], "best", ceil)["x"]
    assert out["paired"]["fvu_ratio"]["values"] == pytest.approx([0.8, 0.8])
    assert out["paired"]["ce_gap_ratio"]["values"] == pytest.approx([0.5, 0.8])
    # (0.2 - 0.16) / (0.2 - 0.1) and (0.4 - 0.32) / (0.4 - 0.2)
    assert out["ceiling"]["gap_closed"]["values"] == pytest.approx([0.4, 0.4])
    worse = analysis.field_versus({"best": runs["best"], "y": [_res(0.79, 0.89), _res(0.59, 0.79)]}, ["y"], "best")
    assert worse["y"]["paired"]["fvu_ratio"]["mean"] > 1 and "ceiling" not in worse["y"]


def test_at_l0_interpolates_in_log_l0_and_never_extrapolates():
    pts = [(64, 0.6, 0.0), (16, 0.4, 0.0)]  # unsorted, as a caller might pass them
    assert analysis.at_l0(pts, 32) == pytest.approx(0.5)  # halfway in log L0
    assert analysis.at_l0(pts, 16) == pytest.approx(0.4) and analysis.at_l0(pts, 64) == pytest.approx(0.6)
    assert analysis.at_l0(pts, 15.9) is None and analysis.at_l0(pts, 64.1) is None
    three = [(16, 0.36, 0.0), (32, 0.52, 0.0), (64, 0.63, 0.0)]
    assert analysis.at_l0(three, 26.3) == pytest.approx(0.36 + 0.16 * math.log2(26.3 / 16))
    assert analysis.at_l0(three, 48) == pytest.approx(0.52 + 0.11 * math.log2(48 / 32))
    with pytest.raises(ValueError):
        analysis.at_l0([(0, 0.1, 0.0), (16, 0.4, 0.0)], 8)


def _sparse(ev, ce, l0):
    return {**_res(ev, ce), "sparsity": {"l0": l0}}


def test_matched_l0_reads_the_baseline_at_each_runs_own_l0():
    ev_pts, ce_pts = [(16, 0.4, 0.0), (64, 0.6, 0.0)], [(16, 0.8, 0.0), (64, 0.9, 0.0)]
    runs = {"x": [_sparse(0.55, 0.9, 32), _sparse(0.4, 0.8, 16)], "far": [_sparse(0.9, 0.9, 2000)]}
    got = analysis.matched_l0(runs, "x", ev_pts, ce_pts)
    # at L0 32 TopK's FVU is 0.5 and its CE gap 0.15; at 16, 0.6 and 0.2
    assert got["fvu_ratio"]["values"] == pytest.approx([0.45 / 0.5, 1.0])
    assert got["ce_gap_ratio"]["values"] == pytest.approx([0.1 / 0.15, 1.0])
    assert got["l0"]["mean"] == pytest.approx(24)
    far = analysis.matched_l0(runs, "far", ev_pts, ce_pts)
    assert far["fvu_ratio"] is None and far["ce_gap_ratio"] is None  # outside the frontier: no ratio
    out = analysis.field_versus({"best": [_sparse(0.5, 0.85, 32)], "x": runs["x"][:1]}, ["x"], "best",
                                frontier=(ev_pts, ce_pts))["x"]
    assert out["matched"]["fvu_ratio"]["mean"] == pytest.approx(0.9)
