"""Every table of the notebooks, as Markdown, LaTeX (a plain ``tabular`` with ``\\hline``) and CSV, written
atomically, or as text for printing in a notebook.

    results_table, text_table    one row per metric, one column per SAE: mean ± se (01-04)
    write_results                a notebook's results JSON and results table
    format_table, write_tables   one row per measured case, columns chosen from `OVERHEAD_COLUMNS` (05)
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from trsae.io import atomic_write_text, write_json_atomic
from trsae.report.values import (SINGLE_SEED_NOTE, Panel, format_mean_se, group_thousands, is_single_seed, metric_n,
                                 metric_value, row_label)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(s))


def _cell(mv: tuple[float, float] | None, n: int | None, latex: bool, digits: int = 3) -> str:
    """``mean ± se`` rounded to the se (`format_mean_se`), a single seed's mean marked; ``n/a`` / ``--`` if none."""
    if mv is None:
        return "n/a" if not latex else "--"
    text = format_mean_se(mv[0], mv[1], n, latex, digits=digits)
    return f"${text}$" if latex else text


def _cells(results: dict[str, dict[str, Any]], row: Panel, latex: bool, digits: int = 3) -> list[str]:
    return [_cell(metric_value(res, row[0], row[1]), metric_n(res, row[0], row[1]), latex, digits)
            for res in results.values()]


def _any_single_seed(results: dict[str, dict[str, Any]], rows: Sequence[Panel]) -> bool:
    return any(is_single_seed((metric_value(res, s, k) or (None,))[0], metric_n(res, s, k))
               for res in results.values() for s, k, _ in rows)


TEX_COLUMNS = 3
"""SAE columns per block of a LaTeX results table: a mean ± se cell at ``\\small`` is about 95 pt wide and the label
column up to 140 pt, so three fit the paper's 468 pt text width and four do not."""


def _tex_head(name: str) -> str:
    """A column head in LaTeX: a name of several words (a site map's "gemma-3-270m L15 resid_post") on two lines,
    its first word above the rest, so that the column is as wide as its cells rather than its name."""
    first, _, rest = name.partition(" ")
    if not rest:
        return _tex_escape(name)
    return f"\\begin{{tabular}}[b]{{@{{}}r@{{}}}}{_tex_escape(first)}\\\\{_tex_escape(rest)}\\end{{tabular}}"


def results_table(
    results: dict[str, dict[str, Any]],
    rows: Sequence[Panel],
    path_md: str | os.PathLike | None = None,
    path_tex: str | os.PathLike | None = None,
    path_csv: str | os.PathLike | None = None,
    digits: int = 3,
) -> dict[str, Path]:
    """Table with one row per metric ``(section, key, label)`` and one column per SAE: mean ± se.

    Rows are named in words (`row_label`). Markdown and LaTeX (a plain ``tabular`` with ``\\hline``, no booktabs;
    `TEX_COLUMNS` SAEs per block, the blocks one under the other, so that it fits the page at ``\\small``) show
    cells rounded to their standard error (`format_mean_se`; ``digits`` significant digits where there is
    none), a single seed's value marked ``†`` and explained in a last line; the CSV has ``metric, section, key``
    then ``<sae> mean``, ``<sae> se`` and ``<sae> n`` per SAE at full precision (empty where not available).
    Returns the paths written.
    """
    names = list(results)
    if not names:
        raise ValueError("no results to tabulate")
    written: dict[str, Path] = {}
    labels = [row_label(*r) for r in rows]
    single = _any_single_seed(results, rows)

    if path_md is not None:
        lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for row, label in zip(rows, labels):
            lines.append(f"| {label} | " + " | ".join(_cells(results, row, False, digits)) + " |")
        lines += ["", SINGLE_SEED_NOTE[False]] if single else []
        written["md"] = atomic_write_text(path_md, "\n".join(lines) + "\n")

    if path_tex is not None:
        width = min(len(names), TEX_COLUMNS)
        # 4 pt between columns instead of LaTeX's 6: the widest label and three mean ± se cells then fit at small size
        lines = ["\\setlength{\\tabcolsep}{4pt}", "\\begin{tabular}{l" + "r" * width + "}", "\\hline"]
        for start in range(0, len(names), width):  # blocks of at most TEX_COLUMNS SAEs, one under the other
            block = {n: results[n] for n in names[start:start + width]}
            pad = [""] * (width - len(block))
            lines += ["Metric & " + " & ".join([_tex_head(n) for n in block] + pad) + " \\\\", "\\hline"]
            for row, label in zip(rows, labels):
                lines.append(_tex_escape(label) + " & " + " & ".join(_cells(block, row, True, digits) + pad) + " \\\\")
            lines.append("\\hline")
        if single:
            lines.append(f"\\multicolumn{{{width + 1}}}{{l}}{{\\footnotesize {SINGLE_SEED_NOTE[True]}}} \\\\")
        lines.append("\\end{tabular}")
        written["tex"] = atomic_write_text(path_tex, "\n".join(lines) + "\n")

    if path_csv is not None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["metric", "section", "key"] + [f"{n} {c}" for n in names for c in ("mean", "se", "n")])
        for (section, key, _), label in zip(rows, labels):
            row: list[Any] = [label, section, key]
            for name in names:
                v = metric_value(results[name], section, key)
                raw = (results[name].get(section) or {}).get(key)
                count = raw.get("n", "") if isinstance(raw, dict) else (1 if v is not None else "")
                row += ["", "", ""] if v is None else [repr(v[0]), repr(v[1]), count]
            w.writerow(row)
        written["csv"] = atomic_write_text(path_csv, buf.getvalue())
    return written


def write_results(summary: dict[str, dict[str, Any]], rows: Sequence[Panel], out_dir: str | os.PathLike, stem: str,
                  per_seed: dict[str, list[dict]], **extra: Any) -> dict[str, Path]:
    """A notebook's results: ``<stem>_results.json`` (``per_seed``, ``summary`` and ``extra``, `write_json_atomic`)
    and ``<stem>_table.{md,tex,csv}`` (`results_table` of ``rows``). Returns the paths written."""
    out = Path(out_dir)
    json_path = write_json_atomic(out / f"{stem}_results.json", {"per_seed": per_seed, "summary": summary, **extra})
    return {"json": json_path, **results_table(summary, rows, out / f"{stem}_table.md", out / f"{stem}_table.tex",
                                               out / f"{stem}_table.csv")}


def text_table(results: dict[str, dict[str, Any]], rows: Sequence[Panel], digits: int = 3) -> str:
    """Plain-text table (one row per metric, one column per SAE, mean ± se as in `results_table`) for printing in
    a notebook."""
    names = list(results)
    cells = [[row_label(*row)] + _cells(results, row, False, digits) for row in rows]
    header = ["metric"] + names
    widths = [max(len(str(r[i])) for r in [header] + cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    note = [SINGLE_SEED_NOTE[False]] if _any_single_seed(results, rows) else []
    return "\n".join([fmt(header)] + [fmt(r) for r in cells] + note)


# ----------------------------------------------------------------------------------------------------------
# rows of measured cases (notebook 05)

OVERHEAD_COLUMNS: list[tuple[str, str, str]] = [
    ("arch", "arch", "s"), ("width_mult", "F/d", "d"), ("window", "w", "d"), ("ctx_len", "T", "d"),
    ("params", "params", ",d"), ("flops_train", "MFLOP/tok train", ".3g"),
    ("train_tok_s", "train tok/s", ".0f"), ("train_ratio", "train ×TopK", ".2f"),
    ("encode_tok_s", "encode tok/s", ".0f"), ("encode_ratio", "encode ×TopK", ".2f"),
    ("train_gflop_s", "train GFLOP/s", ".1f"), ("peak_train_mib", "peak MiB train", ".0f"),
    ("peak_train_ratio", "mem ×TopK", ".2f"), ("peak_encode_mib", "peak MiB encode", ".0f"),
]
"""Columns of the overhead grid: (row key, heading, format spec)."""

OVERHEAD_STATIC_COLUMNS: list[tuple[str, str, str]] = [
    ("arch", "arch", "s"), ("width_mult", "F/d", "d"), ("width", "F", "d"), ("params", "params", ",d"),
    ("params_ratio", "params ×TopK", ".3f"), ("mflops_train", "MFLOP/tok train", ".4g"),
    ("flops_train_ratio", "train ×TopK", ".3f"), ("mflops_encode", "MFLOP/tok encode", ".4g"),
    ("flops_encode_ratio", "encode ×TopK", ".3f"),
]
"""Columns of the computed parameter and FLOP rows (`trsae.overhead.static_rows`)."""


CASE_KEYS = ("arch", "width_mult", "width", "window", "ctx_len")
"""Columns that name a measured case; a LaTeX table repeats them beside each block of measured columns."""
TEX_VALUE_COLUMNS = 4
"""Measured columns per block of a LaTeX case table (with the four case columns they fit the paper's text width at
``\\small``)."""


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "n/a"
    return group_thousands(format(v, spec))  # 12345 -> 12,345 (a comma reads the same in a tabular)


def format_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = OVERHEAD_COLUMNS,
                 style: str = "text") -> str:
    """`rows` as aligned text, "md" or "tex" (columns missing from the rows are dropped; in "tex" the measured columns
    come in blocks of `TEX_VALUE_COLUMNS`, one under the other, each with the `CASE_KEYS` columns).
    MFLOP columns: values are divided by 1e6 when the key is ``flops_*``."""
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    cells = [[_fmt(r.get(key) / 1e6 if key.startswith("flops_") and "ratio" not in key else r.get(key), spec)
              for key, _, spec in cols] for r in rows]
    heads = [h for _, h, _ in cols]
    if style == "md":
        rule = "|".join("---" if key == "arch" else "---:" for key, *_ in cols)
        lines = ["| " + " | ".join(heads) + " |", "|" + rule + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"
    if style == "tex":  # blocks of at most TEX_VALUE_COLUMNS measured columns, each beside the case's own columns
        esc = lambda s: s.replace("×", r"$\times$").replace("%", r"\%").replace("_", r"\_").replace("–", "--")
        ids = [i for i, (key, *_) in enumerate(cols) if key in CASE_KEYS]
        vals = [i for i in range(len(cols)) if i not in ids]
        width = min(len(vals), TEX_VALUE_COLUMNS) if vals else 0
        lines = [r"\begin{tabular}{" + "".join("l" if cols[i][0] == "arch" else "r" for i in ids) + "r" * width + "}",
                 r"\hline"]
        for start in range(0, max(len(vals), 1), max(width, 1)):
            block = ids + vals[start:start + width]
            pad = [""] * (len(ids) + width - len(block))
            lines += [" & ".join([esc(heads[i]) for i in block] + pad) + r" \\", r"\hline"]
            lines += [" & ".join([esc(c[i]) for i in block] + pad) + r" \\" for c in cells]
            lines.append(r"\hline")
        return "\n".join(lines + [r"\end{tabular}"]) + "\n"
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    out = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    out += ["  ".join(x.rjust(w) for x, w in zip(c, widths)) for c in cells]
    return "\n".join(out) + "\n"


LR_COLUMNS = (("arch", "SAE", ""), ("lr", "learning rate", ".3g"))


def lr_table(lrs: dict[str, float] | None, base_lr: float, stem: str | os.PathLike) -> dict[str, Path]:
    """``<stem>.md`` and ``.tex``: the learning rate each family trains at (``lrs``, `trsae.tuning`), or
    ``base_lr`` for every family."""
    rows = ([{"arch": name, "lr": float(lr)} for name, lr in lrs.items()] if lrs
            else [{"arch": "every family", "lr": float(base_lr)}])
    stem = Path(stem)
    return {"md": atomic_write_text(stem.with_suffix(".md"), format_table(rows, LR_COLUMNS, style="md")),
            "tex": atomic_write_text(stem.with_suffix(".tex"), format_table(rows, LR_COLUMNS, style="tex"))}


def write_tables(rows: list[dict[str, Any]], stem: str | os.PathLike) -> dict[str, Path]:
    """``<stem>.md`` and ``.tex`` (formatted `OVERHEAD_COLUMNS`) and ``.csv`` (every scalar field, full precision)."""
    stem = Path(stem)
    keys = [k for k in rows[0] if not isinstance(rows[0][k], list)]
    buf = io.StringIO()
    buf.write(",".join(keys) + "\n")
    for r in rows:
        buf.write(",".join("" if r.get(k) is None else repr(r[k]) if isinstance(r[k], float) else str(r[k])
                           for k in keys) + "\n")
    return {"md": atomic_write_text(stem.with_suffix(".md"), format_table(rows, style="md")),
            "tex": atomic_write_text(stem.with_suffix(".tex"), format_table(rows, style="tex")),
            "csv": atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())}

