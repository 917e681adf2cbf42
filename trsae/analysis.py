"""What the notebooks conclude from trained SAEs and their results: means over seeds, what a TRSAE uses of its
context, the curve over the window sweep."""

from __future__ import annotations

from pathlib import Path

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


def window_curve(summary: dict[str, dict], windows: list[int],
                 metric: tuple[str, str] = ("reconstruction_quality", "explained_variance")) -> dict:
    """``{"TRSAE": [(w, mean, se), ...]}`` over the window sweep (w = 0 placed at 0.5 for a log axis)."""
    pts = []
    for w in windows:
        leaf = summary[f"w={w}"][metric[0]][metric[1]]
        pts.append((max(w, 0.5), leaf["mean"], leaf["se"]))
    return {"TRSAE": pts}
