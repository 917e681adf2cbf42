"""Every figure of the notebooks, in one palette. Pure matplotlib.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot, so importing
this module neither changes a notebook's backend nor leaks open figures. Every file is written atomically
(`save_figure`), so an interrupted run never leaves half a PNG for the paper to pick up.

    comparison and frontier     core metrics per SAE (01, 02, 03): points with ±se bars on an axis zoomed to them
    probing, top contexts       notebook 04
    overhead                    notebook 05: time and memory against F, w and T
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter

from trsae.io import atomic_write_bytes
from trsae.report.values import PROBE_WORDS, Panel, format_mean_se, metric_n, metric_value

PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
           "#64B5CD")
"""The colours of every figure, in order: the i-th SAE (or line, or architecture) of a figure gets ``color(i)``."""
HIGHLIGHT = PALETTE[3]
"""The one colour that marks something out (the top token of a context)."""
DPI = 150
TEXT_WIDTH_IN = 6.5
"""The paper's text width in inches (``\\linewidth`` of an 11pt article with 1in margins). Every figure is drawn at
the size the paper prints it (the paper places PNGs at their own size), so its fonts print at the sizes below."""
HALF_WIDTH_IN = 3.2
"""A figure set beside another on one line of the paper."""
PANEL_WIDTH_IN = 2.15
"""One panel of a row of panels (three fill the text width)."""
MIN_FONT_PT = 6.0
"""The smallest text a figure may print, in points at the size the paper places it."""
PT = {"tick": 6.5, "label": 7.5, "legend": 6.5, "title": 8.0, "value": 6.5}
"""Font sizes (points as printed) of the figures' text; none below `MIN_FONT_PT`."""


def _style(ax, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None) -> None:
    """Print sizes (`PT`) for an axis's ticks, labels and title."""
    ax.tick_params(labelsize=PT["tick"], which="both")
    if xlabel is not None:
        ax.set_xlabel(xlabel, fontsize=PT["label"])
    if ylabel is not None:
        ax.set_ylabel(ylabel, fontsize=PT["label"])
    if title:
        ax.set_title(title, fontsize=PT["title"])


RECONSTRUCTION_PANELS: list[Panel] = [
    ("reconstruction_quality", "explained_variance", "Explained variance"),
    ("reconstruction_quality", "mse", "MSE"),
    ("reconstruction_quality", "cossim", "Cosine similarity"),
]
SPARSITY_PANELS: list[Panel] = [("sparsity", "l0", "L0"), ("sparsity", "l1", "L1")]
PRESERVATION_PANELS: list[Panel] = [
    ("model_behavior_preservation", "kl_div_score", "KL-divergence score"),
    ("model_performance_preservation", "ce_loss_score", "CE-loss score"),
    ("model_performance_preservation", "ce_loss_score_mean_ablation", "CE-loss score (mean abl.)"),
]


def color(i: int) -> str:
    """The i-th colour of `PALETTE` (cycling)."""
    return PALETTE[i % len(PALETTE)]


FONT_KEY = "trsae-min-font-pt"
"""The PNG text chunk holding the smallest font of a figure, in points as drawn: with the PNG's physical width
(its pixels over its dpi) `trsae.paper.figure_fonts` knows the size every figure's text prints at."""


def min_font_pt(fig: Figure) -> float:
    """The smallest font size (points) of any visible, non-empty text of ``fig`` once drawn (tick labels
    included)."""
    FigureCanvasAgg(fig).draw()
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    if not sizes:
        raise ValueError("the figure holds no text")
    return float(min(sizes))


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Save ``fig`` atomically in the format of ``path``'s suffix (PNG without one), a PNG with its smallest
    font under `FONT_KEY`; returns the path."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    buf = io.BytesIO()
    meta = {FONT_KEY: f"{min_font_pt(fig):.2f}"} if fmt == "png" else None
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=meta)
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# comparison figures (named bar_figure for the notebooks that call it: points with error bars, not bars)


BAR_VALUES_UP_TO = 6
"""A comparison figure prints each point's value beside it for up to this many SAEs (more would overlap at print
size; the tables hold every value)."""


def make_bar_figure(
    results: dict[str, dict[str, Any]],
    panels: Sequence[Panel],
    title: str | None = None,
    skip_empty: bool = False,
) -> Figure:
    """One subplot per metric, one point per SAE (in ``results`` order, its `PALETTE` colour) with ±se error bars
    and, for up to `BAR_VALUES_UP_TO` SAEs, its value (`format_mean_se`'s mean: rounded to its se; ``†`` for a single
    seed); `PANEL_WIDTH_IN` per panel, at most the text width.

    The value axis is zoomed to the points and their error bars, not drawn from zero, so that explained variances
    of 0.867 and 0.873 look as different as their error bars allow. An SAE without a value for a panel gets no
    point there (its tick reads "n/a"). With ``skip_empty`` a panel no SAE has a value for is dropped; if nothing
    is left a ``ValueError`` is raised.
    """
    names = list(results)
    if not names:
        raise ValueError("no results to plot")
    panels = list(panels)
    if skip_empty:
        panels = [p for p in panels if any(metric_value(results[n], p[0], p[1]) for n in names)]
    if not panels:
        raise ValueError("no panel has a value for any SAE")
    fig = Figure(figsize=(min(TEXT_WIDTH_IN, PANEL_WIDTH_IN * len(panels)), 2.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    annotate = len(names) <= BAR_VALUES_UP_TO
    for ax, (section, key, label) in zip(axes, panels):
        xs = []
        for i, name in enumerate(names):
            mv = metric_value(results[name], section, key)
            if mv is None:
                continue
            xs.append(i)
            mean, se = mv
            ax.errorbar([i], [mean], yerr=[se], fmt="o", color=color(i), ecolor=color(i), capsize=3, markersize=4)
            if annotate:
                n = metric_n(results[name], section, key)
                text = format_mean_se(mean, se, n, mean_only=True) + ("†" if n == 1 else "")
                ax.annotate(text, (i, mean), xytext=(5, 0), textcoords="offset points", ha="left", va="center",
                            fontsize=PT["value"])
        ax.margins(y=0.2)
        ax.set_xticks(range(len(names)))
        many = len(names) > 3
        ax.set_xticklabels([n if i in xs else f"{n}\n(n/a)" for i, n in enumerate(names)],
                           rotation=90 if many else 0, ha="center")
        ax.set_xlim(-0.6, len(names) - (0.1 if annotate else 0.4))  # room for the last value label
        _style(ax, title=label)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=PT["title"])
    return fig


def bar_figure(
    results: dict[str, dict[str, Any]],
    panels: Sequence[Panel],
    path: str | os.PathLike,
    title: str | None = None,
    skip_empty: bool = False,
) -> Path:
    """``make_bar_figure`` (points with error bars) saved atomically as PNG (dpi 150); returns the path."""
    return save_figure(make_bar_figure(results, panels, title, skip_empty), path)


def reconstruction_figure(results: dict[str, dict[str, Any]], out_dir: str | os.PathLike,
                          title: str | None = "Reconstruction") -> Path:
    """Explained variance, MSE, cosine similarity -> ``out_dir/reconstruction_metrics.png``."""
    return bar_figure(results, RECONSTRUCTION_PANELS, Path(out_dir) / "reconstruction_metrics.png", title)


def sparsity_figure(results: dict[str, dict[str, Any]], out_dir: str | os.PathLike,
                    title: str | None = "Sparsity") -> Path:
    """L0, L1 -> ``out_dir/sparsity_metrics.png``."""
    return bar_figure(results, SPARSITY_PANELS, Path(out_dir) / "sparsity_metrics.png", title)


def preservation_figure(results: dict[str, dict[str, Any]], out_dir: str | os.PathLike,
                        title: str | None = "Model preservation") -> Path:
    """KL-divergence score, CE-loss score (zero and mean ablation) -> ``out_dir/model_preservation.png``.

    The mean-ablation panel is dropped when no SAE has it (any panel with no values is).
    """
    return bar_figure(results, PRESERVATION_PANELS, Path(out_dir) / "model_preservation.png", title,
                      skip_empty=True)


def core_figures(results: dict[str, dict[str, Any]], out_dir: str | os.PathLike, title: str) -> list[Path]:
    """`reconstruction_figure`, `sparsity_figure` and `preservation_figure` of ``results`` in ``out_dir``, titled
    ``"<title>: reconstruction"``, ``"<title>: sparsity"`` and ``"<title>: model preservation"``."""
    return [reconstruction_figure(results, out_dir, f"{title}: reconstruction"),
            sparsity_figure(results, out_dir, f"{title}: sparsity"),
            preservation_figure(results, out_dir, f"{title}: model preservation")]


# ----------------------------------------------------------------------------------------------------------
# frontier


def make_frontier_figure(
    points: dict[str, Iterable[tuple[float, float, float]]],
    ylabel: str,
    title: str | None = None,
    xlabel: str = "L0",
    fits: dict[str, Iterable[tuple[float, float]]] | None = None,
) -> Figure:
    """Metric against L0 (log x), one line per architecture; points ``(l0, value, se)`` sorted by L0. ``fits``:
    a fitted curve ``(x, y)`` per name of ``points``, drawn dashed in that name's colour. `HALF_WIDTH_IN` wide."""
    fig = Figure(figsize=(HALF_WIDTH_IN, 2.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    n_lines = 0
    for i, (name, pts) in enumerate(points.items()):
        pts = sorted((float(a), float(b), float(c or 0.0)) for a, b, c in pts)
        if not pts:
            continue
        if any(p[0] <= 0 for p in pts):
            raise ValueError(f"{name}: L0 must be positive on a log axis")
        l0s, vals, ses = zip(*pts)
        ax.errorbar(l0s, vals, yerr=ses, label=name, color=color(i), marker="o", markersize=3, capsize=2,
                    linewidth=1)
        if fits and name in fits:
            xs, ys = zip(*sorted(fits[name]))
            ax.plot(xs, ys, color=color(i), linestyle="--", linewidth=1, label=f"{name}, fit")
        n_lines += 1
    if n_lines == 0:
        raise ValueError("no points to plot")
    ax.set_xscale("log")
    _style(ax, xlabel, ylabel, title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=PT["legend"])
    return fig


def frontier_figure(
    points: dict[str, Iterable[tuple[float, float, float]]],
    ylabel: str,
    path: str | os.PathLike,
    title: str | None = None,
    xlabel: str = "L0",
    fits: dict[str, Iterable[tuple[float, float]]] | None = None,
) -> Path:
    """``make_frontier_figure`` saved atomically; returns the path."""
    return save_figure(make_frontier_figure(points, ylabel, title, xlabel, fits), path)


def site_map_figure(panels: dict[str, dict[str, Iterable[tuple[float, float, float]]]], path: str | os.PathLike,
                    xlabel: str = "depth (layer + 1) / layers") -> Path:
    """One panel per ratio (``{ylabel: {line: [(depth, mean, se), ...]}}``, e.g. `trsae.analysis.site_points` of
    the FVU and CE-gap ratios), one line per model and site with standard-error bars and a grey line at 1 (below
    it the temporal SAE is better), the legend below the panels; `TEXT_WIDTH_IN` wide, linear depth from 0 to 1."""
    fig = Figure(figsize=(TEXT_WIDTH_IN, 2.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ylabel, lines) in zip(axes, panels.items()):
        for i, (name, pts) in enumerate(lines.items()):
            xs, ys, ses = zip(*sorted(pts))
            ax.errorbar(xs, ys, yerr=ses, label=name, color=color(i), marker="o", markersize=3, capsize=2,
                        linewidth=1)
        ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_xlim(0, 1.02)
        _style(ax, xlabel, ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=PT["legend"], frameon=False)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# notebook 04





def top_contexts_figure(contexts: list[dict], path: str | os.PathLike, labels: dict[int, str] | None = None,
                        n_features: int = 4, n_examples: int = 3, fontsize: float = 8.0) -> Path:
    """The top-activating contexts of the first ``n_features`` features as text at the paper's text width: per
    feature a heading (its number and ``labels[feature]``, e.g. its best label, F1 and density) and its first
    ``n_examples`` contexts, each token shaded by its activation relative to the feature's maximum, the top token
    boxed in `HIGHLIGHT`. Lines wrap at the width; fonts are ``fontsize`` points as printed."""
    if fontsize < MIN_FONT_PT:
        raise ValueError(f"fontsize {fontsize} is below the {MIN_FONT_PT} points a printed figure needs")
    entries = [c for c in contexts if c["examples"]][:n_features]
    line_h = fontsize * 1.9 / 72  # inches per text line
    fig = Figure(figsize=(TEXT_WIDTH_IN, 1.0))
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    lines: list[list[tuple[str, float, bool]] | str] = []  # a heading, or a line of (token, shade, top)
    width_px = TEXT_WIDTH_IN * fig.dpi
    for entry in entries:
        f = entry["feature"]
        top = entry.get("max_act") or max(max(ex["acts"]) for ex in entry["examples"]) or 1.0
        lines.append(f"feature {f}" + (f": {labels[f]}" if labels and f in labels else "")
                     + f" (max activation {top:.3g})")
        for ex in entry["examples"][:n_examples]:
            line, used = [], 0.0
            for j, (tok, act) in enumerate(zip(ex["tokens"], ex["acts"])):
                text = tok.replace("\n", "⏎").replace("$", r"\$")
                w = fig.text(0, 0, text, fontsize=fontsize, family="monospace").get_window_extent(renderer).width
                if line and used + w > width_px * 0.97:
                    lines.append(line)
                    line, used = [], 0.0
                line.append((text, max(0.0, min(1.0, act / top)), j == ex["center"]))
                used += w
            lines.append(line)
    fig.clear()
    height = max(len(lines), 1) * line_h + 0.1
    fig.set_size_inches(TEXT_WIDTH_IN, height)
    renderer = FigureCanvasAgg(fig).get_renderer()
    for i, line in enumerate(lines):
        y = 1 - (i + 0.8) * line_h / height
        if isinstance(line, str):
            fig.text(0.0, y, line, fontsize=fontsize, weight="bold")
            continue
        x = 0.0
        for text, shade, top in line:
            box = {"facecolor": color(0), "alpha": 0.15 + 0.7 * shade, "pad": 0.8, "linewidth": 0}
            if top:
                box |= {"edgecolor": HIGHLIGHT, "linewidth": 1.0}
            t = fig.text(x, y, text, fontsize=fontsize, family="monospace", bbox=box)
            x += t.get_window_extent(renderer).width / (TEXT_WIDTH_IN * fig.dpi)
    return save_figure(fig, path, dpi=200)


def probing_figure(results: dict[str, dict], labels: Sequence[str], ks: Sequence[int],
                   path: str | os.PathLike) -> Path:
    """Probe test accuracy against k (log axis), one panel per label (up to four a row, the text width), one line
    per source."""
    cols = min(4, len(labels))
    rows = -(-len(labels) // cols)
    fig = Figure(figsize=(TEXT_WIDTH_IN, 1.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, label in enumerate(labels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, (name, res) in enumerate(results.items()):
            ys = [(metric_value(res, "probing", f"{label}_k{k}") or (float("nan"),))[0] for k in ks]
            ax.plot(ks, ys, marker="o", markersize=3, linewidth=1, label=name, color=color(j))
        ax.set_xscale("log")
        _style(ax, "k latents" if i >= len(labels) - cols else None, "test accuracy" if i % cols == 0 else None,
               PROBE_WORDS.get(label, label))
    fig.axes[0].legend(fontsize=PT["legend"])
    return save_figure(fig, path, dpi=200)


# ----------------------------------------------------------------------------------------------------------
# notebook 05


def _row(rows: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def overhead_figure(rows: list[dict[str, Any]], centre: tuple[int, int, int], path: str | os.PathLike) -> Path:
    """Log-log panels: train step time, encode time and peak train memory (rows) against F, w and T (columns)
    through `centre`, one colour per architecture (in the order the rows name them). Dashed: time predicted
    from the FLOP count, scaled to pass through each arch's measurement at the centre (so the gap shows where
    time does not follow FLOPs). An arch without a window (``window`` None) is a horizontal line in the w
    column. Rows as `trsae.overhead.overhead_grid` returns them. Saved as PNG."""
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    F0, w0, T0 = centre
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    windowed = {a for a in archs if any(r["arch"] == a and r["window"] is not None for r in rows)}
    have_mem = "peak_train_mib" in rows[0]
    quantities = [("train_s", "flops_train", "train step (s)"), ("encode_s", "flops_encode", "encode (s)")]
    if have_mem:
        quantities.append(("peak_train_mib", None, "peak train memory (MiB)"))
    fig = Figure(figsize=(TEXT_WIDTH_IN, 1.9 * len(quantities)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(quantities), 3, squeeze=False)
    axes_spec = [("width_mult", "F / d", {"ctx_len": T0}),
                 ("window", "window w", {"width_mult": F0, "ctx_len": T0}),
                 ("ctx_len", "context length T", {"width_mult": F0})]
    for i, (qkey, fkey, qlabel) in enumerate(quantities):
        for j, (xkey, xlabel, fixed) in enumerate(axes_spec):
            ax = axes[i][j]
            for c, arch in enumerate(archs):
                pts = sorted((r[xkey], r) for r in rows if r["arch"] == arch
                             and all(r[k] == v for k, v in fixed.items())
                             and (xkey == "window" or r["window"] in (None, w0)))
                if not pts:
                    continue
                centre_row = _row(rows, arch=arch, width_mult=F0, ctx_len=T0,
                                  window=w0 if arch in windowed else None)
                if xkey == "window" and arch not in windowed:
                    ax.axhline(pts[0][1][qkey], color=color(c), lw=1, alpha=0.7, label=arch)
                    continue
                xs, ys = [x for x, _ in pts], [r[qkey] for _, r in pts]
                ax.plot(xs, ys, "o-", color=color(c), label=arch, ms=3, lw=1)
                if fkey and centre_row is not None:
                    scale = centre_row[qkey] / (centre_row[fkey] * centre_row["tokens"])
                    ax.plot(xs, [r[fkey] * r["tokens"] * scale for _, r in pts], "--", color=color(c), lw=1,
                            alpha=0.7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(plain)
            ax.yaxis.set_major_formatter(plain)
            lo, hi = ax.get_ylim()  # label minor ticks only where no decade tick is in view
            ax.yaxis.set_minor_formatter(plain if hi / lo < 20 else FuncFormatter(lambda v, _: ""))
            _style(ax, xlabel if i == len(quantities) - 1 else None, qlabel if j == 0 else None)
            ax.grid(alpha=0.3, which="both")
            if i == 0 and j == 0:
                ax.legend(fontsize=PT["legend"], title="solid: measured\ndashed: ∝ FLOPs",
                          title_fontsize=PT["legend"])
    fig.suptitle(f"Overhead (d={rows[0]['width'] // rows[0]['width_mult']}, B={rows[0]['batch']}; "
                 f"sweeps through F={F0}d, w={w0}, T={T0})", fontsize=PT["title"])
    return save_figure(fig, path, dpi=200)
