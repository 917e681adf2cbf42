"""Figures, tables and paper macros from (seed-aggregated) results. Pure matplotlib + json.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot, so
importing this module neither changes a notebook's backend nor leaks open figures. Every file is written
atomically (temp file in the same folder, then ``os.replace``), so an interrupted run never leaves half a
PNG or half a macro file for the paper to pick up.

A results value may be an aggregated leaf ``{"mean", "se", "n", "values"}`` (``metrics.aggregate_seeds``) or
a plain number (se taken as 0); a missing or ``None`` value is drawn / printed as not available.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trsae.io import atomic_write_bytes

__all__ = [
    "metric_value",
    "format_number",
    "make_bar_figure",
    "bar_figure",
    "reconstruction_figure",
    "sparsity_figure",
    "preservation_figure",
    "RECONSTRUCTION_PANELS",
    "SPARSITY_PANELS",
    "PRESERVATION_PANELS",
    "make_frontier_figure",
    "frontier_figure",
    "results_table",
    "macro_name",
    "write_macros",
]

Panel = tuple[str, str, str]  # (section, key, label)

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

_DPI = 150
_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
           "#CCB974", "#64B5CD"]


# ----------------------------------------------------------------------------------------------------------
# values and formatting


def metric_value(result: dict[str, Any], section: str, key: str) -> tuple[float, float] | None:
    """``(mean, se)`` of ``result[section][key]``, or None when missing / undefined / non-finite."""
    v = (result.get(section) or {}).get(key)
    if isinstance(v, dict):
        mean, se = v.get("mean"), v.get("se") or 0.0
    else:
        mean, se = v, 0.0
    if mean is None or isinstance(mean, bool):
        return None
    try:
        mean, se = float(mean), float(se)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(mean):
        return None
    return mean, (se if math.isfinite(se) else 0.0)


def format_number(v: float | int | None, digits: int = 3, latex: bool = False) -> str:
    """``digits`` significant digits in fixed notation; scientific below 1e-3; ints as they are.

    ``None`` / NaN give ``"n/a"``. With ``latex=True`` scientific values read ``1.20\\times10^{-4}``
    (wrap in math mode yourself; ``write_macros`` adds ``\\ensuremath``).
    """
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        raise TypeError("booleans are not numbers here")
    if isinstance(v, numbers.Integral):
        return str(int(v))
    v = float(v)
    if not math.isfinite(v):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a < 1e-3:
        mant, exp = f"{v:.{max(digits - 1, 0)}e}".split("e")
        return f"{mant}\\times10^{{{int(exp)}}}" if latex else f"{mant}e{int(exp)}"
    decimals = max(0, digits - 1 - math.floor(math.log10(a)))
    return f"{v:.{decimals}f}"


# ----------------------------------------------------------------------------------------------------------
# atomic writes


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format=fmt, dpi=_DPI, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# bar figures


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def make_bar_figure(
    results: dict[str, dict[str, Any]],
    panels: Sequence[Panel],
    title: str | None = None,
    skip_empty: bool = False,
) -> Figure:
    """One subplot per metric, one bar per SAE (in ``results`` order) with ±se error bars and its value.

    An SAE without a value for a panel gets no bar there (its tick reads "n/a"). With ``skip_empty`` a panel
    no SAE has a value for is dropped; if nothing is left a ``ValueError`` is raised.
    """
    names = list(results)
    if not names:
        raise ValueError("no results to plot")
    panels = list(panels)
    if skip_empty:
        panels = [p for p in panels if any(metric_value(results[n], p[0], p[1]) for n in names)]
    if not panels:
        raise ValueError("no panel has a value for any SAE")
    fig = Figure(figsize=(max(3.2, 0.6 * len(names) + 1.6) * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (section, key, label) in zip(axes, panels):
        xs, means, ses, colors, texts = [], [], [], [], []
        for i, name in enumerate(names):
            mv = metric_value(results[name], section, key)
            if mv is None:
                continue
            xs.append(i)
            means.append(mv[0])
            ses.append(mv[1])
            colors.append(_color(i))
            texts.append(format_number(mv[0], 3))
        if xs:
            ax.bar(xs, means, yerr=ses, color=colors, capsize=3, edgecolor="black", linewidth=0.5)
            for x, m, s, text in zip(xs, means, ses, texts):  # value label just beyond the error bar
                ax.annotate(text, (x, m + s if m >= 0 else m - s), xytext=(0, 2 if m >= 0 else -2),
                            textcoords="offset points", ha="center", va="bottom" if m >= 0 else "top",
                            fontsize=7)
            ax.margins(y=0.15)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n if i in xs else f"{n}\n(n/a)" for i, n in enumerate(names)],
                           rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center",
                           fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def bar_figure(
    results: dict[str, dict[str, Any]],
    panels: Sequence[Panel],
    path: str | os.PathLike,
    title: str | None = None,
    skip_empty: bool = False,
) -> Path:
    """``make_bar_figure`` saved atomically as PNG (dpi 150); returns the path."""
    return _save_figure(make_bar_figure(results, panels, title, skip_empty), path)


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


# ----------------------------------------------------------------------------------------------------------
# frontier


def make_frontier_figure(
    points: dict[str, Iterable[tuple[float, float, float]]],
    ylabel: str,
    title: str | None = None,
    xlabel: str = "L0",
) -> Figure:
    """Metric against L0 (log x), one line per architecture; points ``(l0, value, se)`` sorted by L0."""
    fig = Figure(figsize=(5.0, 3.8), layout="constrained")
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
        ax.errorbar(l0s, vals, yerr=ses, label=name, color=_color(i), marker="o", markersize=4, capsize=3)
        n_lines += 1
    if n_lines == 0:
        raise ValueError("no points to plot")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def frontier_figure(
    points: dict[str, Iterable[tuple[float, float, float]]],
    ylabel: str,
    path: str | os.PathLike,
    title: str | None = None,
    xlabel: str = "L0",
) -> Path:
    """``make_frontier_figure`` saved atomically; returns the path."""
    return _save_figure(make_frontier_figure(points, ylabel, title, xlabel), path)


# ----------------------------------------------------------------------------------------------------------
# tables

_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(s))


def _cell(mv: tuple[float, float] | None, digits: int, latex: bool) -> str:
    if mv is None:
        return "n/a" if not latex else "--"
    mean, se = mv
    m, s = format_number(mean, digits, latex), format_number(se, max(digits - 1, 1), latex)
    return f"${m} \\pm {s}$" if latex else f"{m} ± {s}"


def results_table(
    results: dict[str, dict[str, Any]],
    rows: Sequence[Panel],
    path_md: str | os.PathLike | None = None,
    path_tex: str | os.PathLike | None = None,
    path_csv: str | os.PathLike | None = None,
    digits: int = 3,
) -> dict[str, Path]:
    """Table with one row per metric ``(section, key, label)`` and one column per SAE: mean ± se.

    Markdown and LaTeX (a plain ``tabular`` with ``\\hline``, no booktabs) show formatted cells; the CSV has
    ``metric, section, key`` then ``<sae> mean``, ``<sae> se`` and ``<sae> n`` per SAE at full precision
    (empty where not available). Returns the paths written.
    """
    names = list(results)
    if not names:
        raise ValueError("no results to tabulate")
    written: dict[str, Path] = {}
    vals = {(r[0], r[1]): [metric_value(results[n], r[0], r[1]) for n in names] for r in rows}

    if path_md is not None:
        lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for section, key, label in rows:
            lines.append(f"| {label} | " + " | ".join(_cell(v, digits, False) for v in vals[(section, key)])
                         + " |")
        written["md"] = atomic_write_bytes(path_md, ("\n".join(lines) + "\n").encode())

    if path_tex is not None:
        lines = ["\\begin{tabular}{l" + "r" * len(names) + "}", "\\hline",
                 "Metric & " + " & ".join(_tex_escape(n) for n in names) + " \\\\", "\\hline"]
        for section, key, label in rows:
            lines.append(_tex_escape(label) + " & "
                         + " & ".join(_cell(v, digits, True) for v in vals[(section, key)]) + " \\\\")
        lines += ["\\hline", "\\end{tabular}"]
        written["tex"] = atomic_write_bytes(path_tex, ("\n".join(lines) + "\n").encode())

    if path_csv is not None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["metric", "section", "key"] + [f"{n} {c}" for n in names for c in ("mean", "se", "n")])
        for section, key, label in rows:
            row: list[Any] = [label, section, key]
            for name, v in zip(names, vals[(section, key)]):
                raw = (results[name].get(section) or {}).get(key)
                count = raw.get("n", "") if isinstance(raw, dict) else (1 if v is not None else "")
                row += ["", "", ""] if v is None else [repr(v[0]), repr(v[1]), count]
            w.writerow(row)
        written["csv"] = atomic_write_bytes(path_csv, buf.getvalue().encode())
    return written


# ----------------------------------------------------------------------------------------------------------
# macros

_MACRO_NAME = re.compile(r"^[A-Za-z]+$")
_DIGIT_WORDS = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]


def macro_name(*parts: str) -> str:
    """A letters-only TeX macro name from free-form parts: ``macro_name("trsae", "topk_32", "ev")`` ->
    ``trsaeTopkThreeTwoEv``. Digits are spelled out, other characters split words."""
    words: list[str] = []
    for part in parts:
        for token in re.findall(r"[A-Za-z]+|[0-9]", str(part)):
            words.append(_DIGIT_WORDS[int(token)] if token.isdigit() else token)
    if not words:
        raise ValueError(f"no letters or digits in {parts!r}")
    name = words[0][0].lower() + words[0][1:] + "".join(w[0].upper() + w[1:] for w in words[1:])
    return name


def write_macros(macros: dict[str, float | int | str], path: str | os.PathLike, digits: int = 3) -> Path:
    """Write ``\\newcommand{\\name}{value}`` lines, one per macro, atomically; returns the path.

    Names must be letters only (TeX control words), else ``ValueError``. Floats get ``digits`` significant
    digits (``format_number``; below 1e-3 in ``\\ensuremath{a\\times10^{b}}``), ints are written as they
    are, strings verbatim (they may hold LaTeX). A non-finite or ``None`` value raises ``ValueError``: a
    number that was not measured must not reach the paper as a placeholder.
    """
    lines = ["% Generated by trsae.report.write_macros; do not edit by hand."]
    for name, value in macros.items():
        if not isinstance(name, str) or not _MACRO_NAME.match(name):
            raise ValueError(f"macro name {name!r} must be letters only (A-Z, a-z)")
        if isinstance(value, bool) or value is None:
            raise ValueError(f"macro {name}: unsupported value {value!r}")
        if isinstance(value, str):
            text = value
        elif isinstance(value, numbers.Integral):
            text = str(int(value))
        else:
            try:
                f = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"macro {name}: unsupported value {value!r}") from None
            if not math.isfinite(f):
                raise ValueError(f"macro {name}: value {value!r} is not finite")
            text = format_number(f, digits, latex=True)
            if "\\times" in text:
                text = f"\\ensuremath{{{text}}}"
        lines.append(f"\\newcommand{{\\{name}}}{{{text}}}")
    return atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def text_table(results: dict[str, dict[str, Any]], rows: Sequence[Panel], digits: int = 3) -> str:
    """Plain-text table (one row per metric, one column per SAE, mean ± se) for printing in a notebook."""
    names = list(results)
    cells = [[label] + [_cell(metric_value(results[n], s, k), digits, False) for n in names]
             for s, k, label in rows]
    header = ["metric"] + names
    widths = [max(len(str(r[i])) for r in [header] + cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header)] + [fmt(r) for r in cells])
