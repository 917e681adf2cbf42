"""What the notebooks conclude from trained SAEs and their results: means over seeds, what a TRSAE uses of its
context, the curve over the window sweep."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from trsae.metrics import aggregate_seeds


def summarize(per_seed: dict[str, list[dict]]) -> dict[str, dict]:
    """Means and standard errors over seeds for every name (`trsae.metrics.aggregate_seeds`)."""
    return {name: aggregate_seeds(rs, keep=("config", "run")) for name, rs in per_seed.items()}


def temporal_usage(per_seed: list[dict], threshold: float = 0.1,
                   sweep: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)) -> dict:
    """What a trained TRSAE uses of its context: per seed, the features whose gated context strength
    ``g_f‖U_f‖`` exceeds ``threshold`` times their token term ``‖W_enc[:, f]‖`` (open gates), and those with a
    position embedding above it, with their buckets; ``by_threshold`` gives both counts over ``sweep``."""
    from trsae.saes import load_sae

    rows = []
    for res in per_seed:
        enc = load_sae(Path(res["run"]) / "sae").encoder
        pos = enc.positional_features(threshold)
        F = enc.b_enc.shape[0]
        rows.append({"open_gates": enc.open_gates(threshold), "open_gate_frac": enc.open_gates(threshold) / F,
                     "positional_features": len(pos), "positional_frac": len(pos) / F,
                     "positional_examples": pos[:20],
                     "bucket_counts": _bucket_counts(pos, enc.cfg.n_buckets),
                     "by_threshold": [{"threshold": t, "open_gates": enc.open_gates(t),
                                       "positional_features": len(enc.positional_features(t))} for t in sweep]})
    return {"threshold": threshold, "per_seed": rows}


def _bucket_counts(pos: list[tuple[int, list[int]]], n_buckets: int) -> list[int]:
    counts = [0] * n_buckets
    for _, buckets in pos:
        for b in buckets:
            counts[b] += 1
    return counts


def window_name(w: int, full_window: int) -> str:
    """The `trsae.experiments.ablation_specs` name of the sweep's point at window w."""
    return "full" if w == full_window else f"w={w}"


def window_curve(summary: dict[str, dict], windows: list[int], full_window: int,
                 metric: tuple[str, str] = ("reconstruction_quality", "explained_variance")) -> dict:
    """``{"TRSAE": [(w, mean, se), ...]}`` over the window sweep (w = 0 placed at 0.5 for a log axis)."""
    pts = []
    for w in windows:
        leaf = summary[window_name(w, full_window)][metric[0]][metric[1]]
        pts.append((max(w, 0.5), leaf["mean"], leaf["se"]))
    return {"TRSAE": pts}


# --------------------------------------------------------------------------------------------- seed-paired comparisons

EV = ("reconstruction_quality", "explained_variance")
CE = ("model_performance_preservation", "ce_loss_score")
TRAIN_FVU = "train_split_fvu"
"""A result's FVU on the training split (`trsae.runner.train_budgets`), beside the test split's EV: a curve that
trains for several epochs shows there whether it overfits."""


def _leaf(res: dict, path: tuple[str, str]) -> float:
    return res[path[0]][path[1]]


def paired(per_seed: dict[str, list[dict]], a: str, b: str) -> dict:
    """SAE `a` against SAE `b`, seed by seed (the same seed gives both the same data order; per-token twins also
    share the initial dictionary): ``{"paired": {key: {"mean", "se", "n", "values"}}}`` over seeds, with
    ``fvu_ratio`` = (1 - EV_a) / (1 - EV_b), ``ce_gap_ratio`` = (1 - CE_a) / (1 - CE_b) (pooled EV; CE-loss score
    against zero-ablation), and the differences ``d_ev`` = EV_a - EV_b and ``d_ce`` = CE_a - CE_b."""
    rows = _paired_rows(per_seed, a, b)
    for row, ra, rb in zip(rows, per_seed[a], per_seed[b]):
        row["paired"].update(d_ev=_leaf(ra, EV) - _leaf(rb, EV), d_ce=_leaf(ra, CE) - _leaf(rb, CE))
    return aggregate_seeds(rows)


def separated(x: dict, y: dict | None = None, z: float = 2.0) -> bool:
    """Whether mean ± z·se of `x` excludes `y`'s interval (or 0 when `y` is None); never with one seed (se 0)."""
    if x["n"] < 2 or (y is not None and y["n"] < 2):
        return False
    lo_x, hi_x = x["mean"] - z * x["se"], x["mean"] + z * x["se"]
    lo_y, hi_y = (0.0, 0.0) if y is None else (y["mean"] - z * y["se"], y["mean"] + z * y["se"])
    return hi_x < lo_y or lo_x > hi_y


def ablation_effects(per_seed: dict[str, list[dict]], components: tuple[str, ...]) -> dict[str, dict]:
    """``{component: paired("full", component)}``: the seed-paired effect of removing each component that was run
    (positive ``d_ev``: the full model explains more)."""
    return {c: paired(per_seed, "full", c) for c in components if c in per_seed}


def ablation_claims(per_seed: dict[str, list[dict]], effects: dict[str, dict], windows: list[int],
                    full_window: int) -> dict:
    """What the ablation study may claim: ``d_ev`` (each removal's paired EV effect), ``largest`` = (component
    with the largest |effect|, the runner-up, whether their two-standard-error intervals are disjoint),
    ``separated_from_zero`` (components whose effect excludes 0 at two standard errors, largest first) and
    ``best_window`` = (window with the highest mean EV, the runner-up, whether their seed-paired difference
    exceeds two standard errors)."""
    d_ev = {c: e["paired"]["d_ev"] for c, e in effects.items()}
    ranked = sorted(d_ev, key=lambda c: -abs(d_ev[c]["mean"]))
    top, runner = ranked[0], ranked[1]
    gap = {"mean": abs(d_ev[top]["mean"]) - abs(d_ev[runner]["mean"]), "n": min(d_ev[top]["n"], d_ev[runner]["n"]),
           "se": (d_ev[top]["se"] ** 2 + d_ev[runner]["se"] ** 2) ** 0.5}
    names = {w: window_name(w, full_window) for w in windows}
    mean_ev = {w: sum(_leaf(r, EV) for r in per_seed[n]) / len(per_seed[n]) for w, n in names.items()}
    best, second = sorted(windows, key=lambda w: -mean_ev[w])[:2]
    lead = paired(per_seed, names[best], names[second])["paired"]["d_ev"]
    return {"d_ev": d_ev, "largest": (top, runner, separated(gap)),
            "separated_from_zero": [c for c in ranked if separated(d_ev[c])],
            "best_window": (best, second, separated(lead))}


def strongest(per_seed: dict[str, list[dict]], names: list[str]) -> dict:
    """The per-token baseline with the highest mean pooled explained variance among `names`, the runner-up, and
    whether the lead (seed-paired EV difference) is larger than two standard errors."""
    ranked = sorted(names, key=lambda n: -sum(_leaf(r, EV) for r in per_seed[n]) / len(per_seed[n]))
    best, second = ranked[0], ranked[1]
    lead = paired(per_seed, best, second)["paired"]["d_ev"]
    return {"best": best, "second": second, "lead": lead, "separated": separated(lead)}


def amortisation(ceil: dict[str, list[dict]], twins: dict[str, str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The amortisation ceiling (`trsae.runner.ceilings` per seed) summarised: ``(per_sae, closed)``.

    ``per_sae[name]["ceiling"]``: each SAE's encoder FVU, the pursuit's FVU on its dictionary and their ratio
    (means ± se over seeds). ``closed[temporal]["ceiling"]``, seed by seed against its per-token twin: the twin's
    amortisation gap (its encoder's FVU minus the pursuit's on its dictionary), the FVU the temporal encoder gains
    over the twin, and ``gap_closed``, the share of the gap that gain closes (1: as good as the pursuit)."""
    per_sae = {name: aggregate_seeds([{"ceiling": r} for r in rs]) for name, rs in ceil.items()}
    closed = {}
    for tr, base in twins.items():
        if tr in ceil and base in ceil:
            rows = []
            for rt, rb in zip(ceil[tr], ceil[base], strict=True):
                gap, gain = rb["fvu_encoder"] - rb["fvu_pursuit"], rb["fvu_encoder"] - rt["fvu_encoder"]
                rows.append({"ceiling": {"amortisation_gap": gap, "temporal_gain": gain, "gap_closed": gain / gap}})
            closed[tr] = aggregate_seeds(rows)
    return per_sae, closed


def at_l0(points: list[tuple[float, float, float]], l0: float) -> float | None:
    """A frontier's value at ``l0``: ``points`` are (L0, value, se) as `trsae.runner.frontier` gives them, linearly
    interpolated in log L0 between the two points around ``l0``; None outside the frontier's L0 range (a frontier is
    never extrapolated)."""
    pts = sorted((float(a), float(v)) for a, v, _ in points)
    if not pts or not pts[0][0] > 0:
        raise ValueError(f"a frontier needs points at positive L0, got {points}")
    if not pts[0][0] <= l0 <= pts[-1][0]:
        return None
    return float(np.interp(math.log(l0), [math.log(a) for a, _ in pts], [v for _, v in pts]))


def matched_l0(runs: dict[str, list[dict]], name: str, ev_points: list[tuple[float, float, float]],
               ce_points: list[tuple[float, float, float]]) -> dict:
    """SAE ``name`` against a baseline at the SAE's own L0, seed by seed: the baseline's FVU (1 − pooled EV) and CE
    gap (1 − CE-loss score) read off its frontiers ``ev_points`` and ``ce_points`` (`trsae.runner.frontier`, one seed)
    at each run's measured L0 by `at_l0`, as ``{"fvu_ratio", "ce_gap_ratio", "l0"}`` aggregated over seeds; a run
    whose L0 lies outside the frontier has no ratio (every run outside: the ratios are None)."""
    rows = []
    for r in runs[name]:
        l0 = float(r["sparsity"]["l0"])
        ev_b, ce_b = at_l0(ev_points, l0), at_l0(ce_points, l0)
        rows.append({"l0": l0, "fvu_ratio": None if ev_b is None else (1 - _leaf(r, EV)) / (1 - ev_b),
                     "ce_gap_ratio": None if ce_b is None else (1 - _leaf(r, CE)) / (1 - ce_b)})
    return aggregate_seeds(rows)


def field_versus(runs: dict[str, list[dict]], names: list[str], best: str, ceil: dict[str, list[dict]] | None = None,
                 twin: str = "TopK",
                 frontier: tuple[list[tuple[float, float, float]], list[tuple[float, float, float]]] | None = None,
                 ) -> dict[str, dict]:
    """Each of ``names`` against the strongest per-token baseline ``best``, seed by seed: `versus` (FVU and CE-gap
    ratios, whether each is apart from 1 by two standard errors), and with ``ceil`` (`trsae.runner.ceilings` per seed)
    ``ceiling.gap_closed``: the share of ``twin``'s amortisation gap on its own dictionary that the SAE's FVU closes,
    (FVU_twin − FVU_sae) / (FVU_twin − FVU_pursuit on the twin's dictionary), with FVU_twin the pursuit pass's own.
    With ``frontier`` (``twin``'s explained-variance and CE-loss-score frontiers over k) ``"matched"``: `matched_l0`,
    the ratios to ``twin`` at the SAE's own L0, for an SAE whose L0 is not k (a BatchTopK, a prediction that leaves
    slots empty)."""
    out = {}
    for name in names:
        res = versus(runs, name, best)
        if frontier is not None:
            res["matched"] = matched_l0(runs, name, *frontier)
        if ceil is not None and twin in ceil:
            rows = [{"ceiling": {"gap_closed": (rb["fvu_encoder"] - (1 - _leaf(ra, EV)))
                                 / (rb["fvu_encoder"] - rb["fvu_pursuit"])}}
                    for ra, rb in zip(runs[name], ceil[twin], strict=True)]
            res["ceiling"] = aggregate_seeds(rows)["ceiling"]
        out[name] = res
    return out


def by_position(summary: dict[str, dict], key: str) -> dict[str, list[tuple[float, float, float]]]:
    """``{name: [(first position of the bucket, mean, se), ...]}`` of ``temporal_codes.by_position[*][key]``
    (`trsae.metrics.persistence`) for every SAE of a summary, for a line plot against position."""
    out = {}
    for name, res in summary.items():
        rows = (res.get("temporal_codes") or {}).get("by_position") or {}
        pts = [(float(bucket.split("-")[0]), leaf["mean"], leaf["se"]) for bucket, r in rows.items()
               if isinstance(leaf := r.get(key), dict) and leaf.get("mean") is not None]
        if pts:
            out[name] = sorted(pts)
    return out


# ------------------------------------------------------------------------------------------------ training length

def budget_seeds(budgets: list[int], main_tokens: int, seeds: list[int]) -> dict[int, list[int]]:
    """The seeds each training budget is trained with, in increasing budget order: every seed at the two largest
    budgets (so that the curve's last step is read seed by seed, `length_trend_last`) and at the main one
    (``main_tokens``: its runs are the comparison's own), the first seed elsewhere."""
    if not budgets or not seeds:
        raise ValueError("training length needs at least one budget and one seed")
    if any(int(b) <= 0 for b in budgets):
        raise ValueError(f"training budgets must be positive token counts, got {budgets}")
    if main_tokens not in budgets:
        raise ValueError(f"the training budgets {budgets} must include the main one, train.tokens = {main_tokens}: "
                         "the curve is read against the comparison's own runs")
    every = {main_tokens, *sorted(set(budgets))[-2:]}
    return {int(b): list(seeds) if b in every else list(seeds[:1]) for b in sorted(set(budgets))}


def versus(runs: dict[str, list[dict]], a: str, b: str) -> dict:
    """SAE `a` against `b` over the same seeds: each one's FVU (1 − pooled EV) and CE-loss score (zero ablation) as
    means ± se under ``"versus"`` (``fvu_a``, ``fvu_b``, ``ce_a``, ``ce_b``, and ``train_fvu_a`` / ``train_fvu_b``
    where the results carry a train-split FVU, `TRAIN_FVU`), beside `paired`'s ratios, and under
    ``"apart_from_one"`` whether each ratio's distance from 1 exceeds two standard errors (`separated`)."""
    rows = [{"versus": {"fvu_a": 1 - _leaf(ra, EV), "fvu_b": 1 - _leaf(rb, EV), "ce_a": _leaf(ra, CE),
                        "ce_b": _leaf(rb, CE)}} for ra, rb in zip(runs[a], runs[b], strict=True)]
    for row, ra, rb in zip(rows, runs[a], runs[b]):
        if TRAIN_FVU in ra and TRAIN_FVU in rb:  # `trsae.runner.train_budgets`'s train-split FVU
            row["versus"].update(train_fvu_a=ra[TRAIN_FVU], train_fvu_b=rb[TRAIN_FVU])
    out = {**aggregate_seeds(rows), **paired(runs, a, b)}
    out["apart_from_one"] = {key: separated({**leaf, "mean": leaf["mean"] - 1})
                             for key, leaf in out["paired"].items() if key.endswith("_ratio")}
    return out


def training_length(per_budget: dict[int, dict[str, list[dict]]], a: str, b: str) -> dict[int, dict]:
    """`versus` at each training budget (``per_budget[tokens][name]``: per-seed results), keyed by the budget in
    tokens, by increasing budget (`trsae.report.by_budget` labels them for a table)."""
    return {t: versus(per_budget[t], a, b) for t in sorted(per_budget)}


def length_trend(per_budget: dict[int, dict[str, list[dict]]], a: str, b: str, main_tokens: int,
                 key: str = "fvu_ratio") -> dict:
    """How `a`'s ratio to `b` (``key`` of `paired`) changes from the main budget to the largest, seed by seed
    (the two budgets share their seeds): ``{"change": mean ± se of ratio_largest − ratio_main, "toward_one":
    whether the ratio ends closer to 1, "separated": whether the change exceeds two standard errors}``."""
    top = max(per_budget)
    at = {t: [r["paired"][key] for r in _paired_rows(per_budget[t], a, b)] for t in (main_tokens, top)}
    if len(at[top]) != len(at[main_tokens]):
        raise ValueError(f"the main budget ({main_tokens}) and the largest ({top}) need the same seeds")
    change = aggregate_seeds([{"d": y - x} for x, y in zip(at[main_tokens], at[top])])["d"]
    mean_main, mean_top = (sum(v) / len(v) for v in (at[main_tokens], at[top]))
    return {"change": change, "toward_one": abs(1 - mean_top) < abs(1 - mean_main), "separated": separated(change),
            "main": main_tokens, "largest": top}


def length_trend_last(per_budget: dict[int, dict[str, list[dict]]], a: str, b: str, key: str = "fvu_ratio") -> dict:
    """Whether `a`'s ratio to `b` still moves at the end of the curve: its change over the last step, from the
    second-largest budget to the largest, seed by seed (`budget_seeds` trains both with every seed), in the
    `length_trend` form (``"previous"`` names the second-largest budget)."""
    if len(per_budget) < 2:
        raise ValueError("the last step of a training-length curve needs at least two budgets")
    top, previous = sorted(per_budget)[-1], sorted(per_budget)[-2]
    return {**length_trend(per_budget, a, b, previous, key), "previous": previous}


LENGTH_FIT_MIN_BUDGETS = 4
"""Budgets a power law with an offset needs: three parameters and one residual."""


def power_law(t, a: float, b: float, c: float, t_ref: float):
    """``c + a·(t / t_ref)^(−b)``: what FVU approaches (``c``) as training tokens ``t`` grow."""
    return c + a * (np.asarray(t, dtype=float) / t_ref) ** (-b)


def length_fit(points: list[tuple[float, float]]) -> dict:
    """Least-squares fit of ``FVU(t) = c + a·(t / t_ref)^(−b)`` (`power_law`; ``t_ref`` the largest budget, so ``a``
    is how far the largest budget's FVU still sits above the asymptote ``c``; ``a, b, c ≥ 0``) to ``(tokens, FVU)``
    points (scipy's ``curve_fit``): ``{"a" | "b" | "c": {"mean", "se"}, "t_ref", "rms": residual root mean square,
    "n": points}``. The standard errors come from the fit's covariance scaled by its residuals (one residual at
    four budgets: read them as rough)."""
    from scipy.optimize import curve_fit

    t = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if len(set(t.tolist())) < LENGTH_FIT_MIN_BUDGETS:
        raise ValueError(f"a power law with an offset needs at least {LENGTH_FIT_MIN_BUDGETS} distinct budgets, got "
                         f"{sorted(set(t.tolist()))}")
    t_ref = float(t.max())
    order = np.argsort(t)
    p0 = (max(y[order[0]] - y[order[-1]], 1e-6), 0.5, max(0.5 * y.min(), 0.0))
    params, cov = curve_fit(lambda tt, a, b, c: power_law(tt, a, b, c, t_ref), t, y, p0=p0,
                            bounds=([0.0, 0.0, 0.0], [np.inf, 10.0, np.inf]), maxfev=20_000)
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    rms = float(np.sqrt(np.mean((power_law(t, *params, t_ref) - y) ** 2)))
    return {**{k: {"mean": float(v), "se": float(s)} for k, v, s in zip("abc", params, se)}, "t_ref": t_ref,
            "rms": rms, "n": len(t)}


def asymptote_ratio(fit_a: dict, fit_b: dict) -> dict:
    """The ratio of two `length_fit` asymptotes, ``c_a / c_b``, with its first-order (delta-method) standard error,
    treating the two fits as independent: ``{"mean", "se"}`` (nan where ``c_b`` is 0)."""
    ca, cb = fit_a["c"], fit_b["c"]
    if cb["mean"] <= 0:
        return {"mean": math.nan, "se": math.nan}
    return {"mean": ca["mean"] / cb["mean"],
            "se": math.hypot(ca["se"] / cb["mean"], ca["mean"] * cb["se"] / cb["mean"] ** 2)}


def length_fits(table: dict[int, dict]) -> dict | None:
    """`length_fit` of each SAE's mean test FVU over a `training_length` table (``"a"`` and ``"b"``, as in
    `versus`) and the ratio of their asymptotes (`asymptote_ratio`, ``"ratio"``); None with fewer than
    `LENGTH_FIT_MIN_BUDGETS` budgets."""
    if len(table) < LENGTH_FIT_MIN_BUDGETS:
        return None
    fits = {s: length_fit([(t, r["versus"][f"fvu_{s}"]["mean"]) for t, r in table.items()]) for s in "ab"}
    return {**fits, "ratio": asymptote_ratio(fits["a"], fits["b"])}


def fit_curve(fit: dict, budgets: list[float], n: int = 50) -> list[tuple[float, float]]:
    """``n`` points of a `length_fit` curve, log-spaced over the range of ``budgets``, for a figure."""
    ts = np.geomspace(min(budgets), max(budgets), n)
    return list(zip(ts.tolist(), power_law(ts, fit["a"]["mean"], fit["b"]["mean"], fit["c"]["mean"],
                                           fit["t_ref"]).tolist()))


def _paired_rows(runs: dict[str, list[dict]], a: str, b: str) -> list[dict]:
    return [{"paired": {"fvu_ratio": (1 - _leaf(ra, EV)) / (1 - _leaf(rb, EV)),
                        "ce_gap_ratio": (1 - _leaf(ra, CE)) / (1 - _leaf(rb, CE))}}
            for ra, rb in zip(runs[a], runs[b], strict=True)]


def ce_gap_split(runs: dict[str, list[dict]], a: str, b: str) -> dict[str, dict[str, dict]]:
    """Where `a`'s CE-gap ratio to `b` comes from (`trsae.metrics.split`, the results' ``ce_excess``): for each
    position bucket (``"by_position"``) and frequency class (``"by_frequency"``), seed by seed, ``ratio`` = `a`'s
    excess CE over `b`'s on that split's positions (its CE-gap ratio there), ``gap_share`` = the split's share of
    `b`'s whole excess CE, and ``token_share`` its share of the positions; means ± se over seeds."""
    out: dict[str, dict[str, dict]] = {}
    for split in ("by_position", "by_frequency"):
        rows = []
        for ra, rb in zip(runs[a], runs[b], strict=True):
            xa, xb = ra["ce_excess"][split], rb["ce_excess"][split]
            total_b = sum(v["excess"] for v in xb.values())
            n_all = sum(v["n"] for v in xb.values())
            rows.append({key: {"ratio": xa[key]["excess"] / xb[key]["excess"] if xb[key]["excess"] else math.nan,
                               "gap_share": xb[key]["excess"] / total_b if total_b else math.nan,
                               "token_share": xb[key]["n"] / n_all}
                         for key in xb if key in xa})
        keys = [k for k in rows[0] if all(k in r for r in rows)]
        out[split] = aggregate_seeds([{k: r[k] for k in keys} for r in rows])
    return out


def variance_concentration(x_ND, top_frac: float = 0.01) -> dict[str, float]:
    """How concentrated the centred variance of tokens ``x_ND`` is (pooled FVU weighs every token by its share):
    ``top_token_share``, the share held by the ``top_frac`` of tokens farthest from the mean (at least one), and
    ``top_dim_share``, the share of the single largest dimension."""
    import torch

    x = torch.as_tensor(x_ND, dtype=torch.float64)
    sq = (x - x.mean(0)).pow(2)
    total = sq.sum()
    per_token = sq.sum(-1).sort(descending=True).values
    n_top = max(1, int(len(per_token) * top_frac))
    return {"top_token_share": float(per_token[:n_top].sum() / total), "top_dim_share": float(sq.sum(0).max() / total)}


def site_label(model: str, layer: int, site: str) -> str:
    """How the site map names a cell: ``gemma-3-270m L6 resid_post``."""
    return f"{model} L{layer} {site}"


def site_table(maps: dict[str, dict[tuple[int, str], dict]]) -> dict[str, dict]:
    """The site maps of several models (``{model: trsae.runner.site_map}``) as one table, a column per cell named
    by `site_label`, models in the given order and each model's cells by site, then layer."""
    return {site_label(model, layer, site): res for model, cells in maps.items()
            for (layer, site), res in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0]))}


def site_points(maps: dict[str, dict[tuple[int, str], dict]], key: str) -> dict[str, list[tuple[float, float, float]]]:
    """Each model's and site's ``paired`` ratio ``key`` against the cell's relative depth (its ``depth``):
    ``{"<model> <site>": [(depth, mean, se), ...]}``, for `trsae.report.site_map_figure`."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for model, cells in maps.items():
        for (_, site), res in sorted(cells.items()):
            leaf = res["paired"][key]
            out.setdefault(f"{model} {site}", []).append((res["depth"], leaf["mean"], leaf["se"]))
    return out


def site_verdicts(table: dict[str, dict], key: str) -> dict[str, list[str]]:
    """The cells of a `site_table` by where the ``paired`` ratio ``key`` lies: ``below`` 1 or ``above`` 1 by more than
    two standard errors (`separated`), or ``within`` two standard errors of 1."""
    out: dict[str, list[str]] = {"below": [], "above": [], "within": []}
    for label, res in table.items():
        if not res["apart_from_one"][key]:
            out["within"].append(label)
        else:
            out["below" if res["paired"][key]["mean"] < 1 else "above"].append(label)
    return out


def site_gap_cells(table: dict[str, dict]) -> list[str]:
    """The cells of a `site_table` whose ``ceiling`` amortisation gap (the per-token twin's) is more than two standard
    errors above zero: where the share of it a temporal encoder closes can be read (near zero the share is noise)."""
    return [label for label, res in table.items()
            if res["ceiling"]["amortisation_gap"]["mean"] > 0 and separated(res["ceiling"]["amortisation_gap"])]
