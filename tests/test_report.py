"""Figures, tables and macros: files written, bars counted, macros parsed back."""

import ast
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from trsae import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _leaf(mean, se=0.01, n=3):
    return {"mean": mean, "se": se, "n": n, "values": [mean] * n}


def _results(with_mean_abl=True):
    out = {}
    for i, name in enumerate(["ReLU-L1", "TopK", "BatchTopK", "TRSAE"]):
        perf = {"ce_loss_score": _leaf(0.8 + 0.05 * i)}
        if with_mean_abl:
            perf["ce_loss_score_mean_ablation"] = _leaf(0.7 + 0.05 * i)
        out[name] = {
            "reconstruction_quality": {"explained_variance": _leaf(0.6 + 0.1 * i), "mse": _leaf(0.02 / (i + 1)),
                                       "cossim": _leaf(0.9 + 0.02 * i)},
            "sparsity": {"l0": _leaf(32.0), "l1": _leaf(40.0 + i)},
            "model_behavior_preservation": {"kl_div_score": _leaf(0.85 + 0.03 * i)},
            "model_performance_preservation": perf,
        }
    return out


def _points_per_axis(fig):
    return [sum(isinstance(c, ErrorbarContainer) for c in ax.containers) for ax in fig.axes]


def test_package_is_pure():
    """The reporting package imports only the standard library, matplotlib (never pyplot) and trsae's light
    modules; importing it loads no torch."""
    light = {"trsae.io", "trsae.evals"}
    for f in Path(R.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                assert node.level == 0 and mod != "matplotlib.pyplot", (f.name, mod)
                assert not mod.startswith("trsae") or mod in light or mod.startswith("trsae.report"), (f.name, mod)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("trsae") or a.name == "matplotlib.pyplot" for a in node.names)
    code = "import sys, trsae.report, trsae.paper; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_comparison_figure_draws_points_with_errors():
    res = _results()
    fig = R.make_bar_figure(res, R.RECONSTRUCTION_PANELS, title="t")
    assert len(fig.axes) == 3
    assert _points_per_axis(fig) == [4, 4, 4]
    ax = fig.axes[0]
    assert not [c for c in ax.containers if isinstance(c, BarContainer)]  # points, not bars
    ys = [c.lines[0].get_ydata()[0] for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert ys == pytest.approx([0.6, 0.7, 0.8, 0.9])
    assert [t.get_text() for t in ax.texts] == ["0.600", "0.700", "0.800", "0.900"]  # rounded to se = 0.010
    # a missing value drops that SAE's point only
    del res["TopK"]["reconstruction_quality"]["mse"]
    res["TRSAE"]["reconstruction_quality"]["cossim"] = 0.97  # a plain number works too
    fig = R.make_bar_figure(res, R.RECONSTRUCTION_PANELS)
    assert _points_per_axis(fig) == [4, 3, 4]


def test_comparison_figure_zooms_to_the_differences():
    """EV 0.867 and 0.873 must not look equal: the axis spans the points and their error bars, not 0 to 1."""
    res = {"TopK": {"reconstruction_quality": {"explained_variance": _leaf(0.867, 0.002)}},
           "TRSAE": {"reconstruction_quality": {"explained_variance": _leaf(0.873, 0.002)}},
           "one seed": {"reconstruction_quality": {"explained_variance": _leaf(0.880, 0.0, n=1)}}}
    ax = R.make_bar_figure(res, R.RECONSTRUCTION_PANELS[:1]).axes[0]
    lo, hi = ax.get_ylim()
    assert 0.8 < lo < 0.865 and 0.88 < hi < 0.9, (lo, hi)
    assert [t.get_text() for t in ax.texts] == ["0.867", "0.873", "0.880†"]


def test_named_figures_are_written(tmp_path):
    res = _results()
    paths = [R.reconstruction_figure(res, tmp_path), R.sparsity_figure(res, tmp_path),
             R.preservation_figure(res, tmp_path)]
    assert [p.name for p in paths] == ["reconstruction_metrics.png", "sparsity_metrics.png",
                                       "model_preservation.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files
    fig = R.make_bar_figure(res, R.SPARSITY_PANELS)
    assert _points_per_axis(fig) == [4, 4]
    fig = R.make_bar_figure(_results(with_mean_abl=False), R.PRESERVATION_PANELS, skip_empty=True)
    assert _points_per_axis(fig) == [4, 4]
    with pytest.raises(ValueError):
        R.make_bar_figure({"a": {}}, R.PRESERVATION_PANELS, skip_empty=True)


def test_frontier_figure(tmp_path):
    pts = {"TopK": [(64, 0.9, 0.01), (16, 0.7, 0.02), (32, 0.8, 0.0)], "TRSAE": [(16, 0.75, 0.01), (32, 0.85, 0.01)]}
    fig = R.make_frontier_figure(pts, "Explained variance")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    lines = [c.lines[0] for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(lines) == 2 and [t.get_text() for t in ax.get_legend().get_texts()] == ["TopK", "TRSAE"]
    assert list(lines[0].get_xdata()) == [16, 32, 64]  # sorted by L0
    p = R.frontier_figure(pts, "EV", tmp_path / "frontier.png")
    assert p.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        R.make_frontier_figure({"x": [(0, 1.0, 0.0)]}, "y")
    # a fitted curve is drawn dashed in its series' colour
    fig = R.make_frontier_figure(pts, "EV", fits={"TRSAE": [(32, 0.86), (16, 0.74)]})
    dashed = [ln for ln in fig.axes[0].lines if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [16, 32]
    assert dashed[0].get_color() == lines[1].get_color()


def test_length_macros_name_the_last_step_the_train_split_and_the_fits():
    from trsae import analysis

    def leaf(v):
        return {"mean": v, "se": 0.001, "n": 2}

    budgets = [150_000, 300_000, 600_000, 1_200_000]
    table = {t: {"versus": {"fvu_a": leaf(0.03 + 0.02 * (t / 1.2e6) ** -0.5), "fvu_b": leaf(0.04 + 0.02 * (t / 1.2e6) ** -0.5),
                            "ce_a": leaf(0.9), "ce_b": leaf(0.9), "train_fvu_a": leaf(0.05), "train_fvu_b": leaf(0.06)},
                 "paired": {"fvu_ratio": leaf(0.9), "ce_gap_ratio": leaf(0.95)}} for t in budgets}
    trend = {"change": leaf(0.01), "toward_one": True, "separated": False}
    m = R.length_macros(table, {t: [0, 1] for t in budgets}, 300_000, 540_000, {"fvu_ratio": trend},
                        {"fvu_ratio": trend}, analysis.length_fits(table))
    assert m["tmpLengthPrevious"] == "600k tokens" and m["tmpLengthLargest"] == "1.2M tokens"
    assert m["tmpLengthLargestTrainFvuA"] == "0.0500" and "tmpLengthPreviousFvuRatioPm" in m
    assert m["tmpLengthFvuRatioLastTrend"].startswith("does not move")
    assert float(m["tmpLengthFitAsymptoteRatio"]) == pytest.approx(0.75, abs=1e-4)
    assert float(m["tmpLengthFitTopKC"]) == pytest.approx(0.04, abs=1e-5)
    assert "tmpLengthFitTRSAEB" in m
    three = {t: table[t] for t in budgets[1:]}  # no fit below four budgets: no fit macros
    m = R.length_macros(three, {t: [0, 1] for t in three}, 300_000, 540_000, {}, {}, analysis.length_fits(three))
    assert not any("Fit" in k for k in m)


def test_results_table(tmp_path):
    res = _results()
    res["TopK"]["sparsity"]["l1"] = None
    rows = R.RECONSTRUCTION_PANELS + R.SPARSITY_PANELS + [("shrinkage", "l2_ratio", "L2 ratio_x")]
    out = R.results_table(res, rows, tmp_path / "t.md", tmp_path / "t.tex", tmp_path / "t.csv")
    md, tex = out["md"].read_text(), out["tex"].read_text()
    for _, _, label in rows:
        assert f"| {label} |" in md
        assert label.replace("_", r"\_") + " &" in tex
    assert "| 0.600 ± 0.010 |" in md and r"$0.600 \pm 0.010$" in tex
    # four SAEs: a block of TEX_COLUMNS = 3, then one of the fourth (padded), each with its own header row
    assert R.TEX_COLUMNS == 3 and r"\begin{tabular}{lrrr}" in tex and r"\toprule" not in tex
    assert tex.count(r"\\") == 2 * (len(rows) + 1) and tex.count("Metric &") == 2
    fourth = list(res)[3]
    assert f"Metric & {fourth} &  &  \\\\" in tex
    assert tex.index(f"Metric & {fourth}") > tex.index(rows[-1][2].replace("_", r"\_"))  # under the first block
    assert all(name in md.splitlines()[0] for name in res)
    table = list(csv.DictReader(out["csv"].open()))
    assert [r["metric"] for r in table] == [label for _, _, label in rows]
    ev = table[0]
    assert float(ev["TRSAE mean"]) == pytest.approx(0.9) and float(ev["TRSAE se"]) == 0.01 and ev["TRSAE n"] == "3"
    l1 = table[4]
    assert l1["TopK mean"] == "" and float(l1["TRSAE mean"]) == 43.0
    assert table[5]["TRSAE mean"] == ""  # l2_ratio absent everywhere
    assert "†" not in md and "single seed" not in tex  # every cell has three seeds


def test_results_table_in_latex_stacks_a_long_column_name_over_its_cells(tmp_path):
    """A name of several words (the site map's "model Lx site") is set on two lines, so that three such columns
    fit the text width (the cpu build's site table ran 143 pt past it with one-line heads); a one-word name stays
    as it is, and the columns are 4 pt apart."""
    res = _results()
    res = {"gemma-3-270m L15 resid_post": res["TopK"], "TopK": res["TRSAE"]}
    tex = R.results_table(res, R.RECONSTRUCTION_PANELS, path_tex=tmp_path / "t.tex")["tex"].read_text()
    assert tex.splitlines()[0] == r"\setlength{\tabcolsep}{4pt}"
    head = next(line for line in tex.splitlines() if line.startswith("Metric &"))
    assert head == (r"Metric & \begin{tabular}[b]{@{}r@{}}gemma-3-270m\\L15 resid\_post\end{tabular} & TopK \\")


def test_case_table_in_latex_repeats_the_case_columns_beside_each_block():
    """Notebook 05's rows: the measured columns in blocks of `TEX_VALUE_COLUMNS`, each beside arch, F/d, w and T."""
    from trsae.report.tables import CASE_KEYS, TEX_VALUE_COLUMNS

    row = {key: 1 if spec.endswith("d") else 1.0 for key, _, spec in R.OVERHEAD_COLUMNS}
    row |= {"arch": "trsae", "width_mult": 16, "window": 4, "ctx_len": 64}
    tex = R.format_table([row, row | {"arch": "topk"}], style="tex")
    n_values = sum(key not in CASE_KEYS for key, _, _ in R.OVERHEAD_COLUMNS)
    blocks = -(-n_values // TEX_VALUE_COLUMNS)
    assert tex.count("arch & F/d & w & T &") == blocks and tex.count("trsae & 16 & 4 & 64") == blocks
    assert tex.splitlines()[0] == r"\begin{tabular}{lrrr" + "r" * TEX_VALUE_COLUMNS + "}"
    heads = [h.replace("×", r"$\times$") for key, h, _ in R.OVERHEAD_COLUMNS if key not in CASE_KEYS]
    assert all(h in tex for h in heads) and all(line.count("&") == 3 + TEX_VALUE_COLUMNS
                                                for line in tex.splitlines() if line.endswith(r"\\"))


def test_table_cells_are_rounded_to_their_standard_error(tmp_path):
    res = {"TRSAE": {"r": {"ev": _leaf(0.91123, 0.000472), "tokens": _leaf(300000.0, 0.0)}},
           "TopK": {"r": {"ev": _leaf(0.902, 0.00100), "tokens": _leaf(300000.0, 0.0)}},
           "one seed": {"r": {"ev": _leaf(0.88888, 0.0, n=1), "tokens": _leaf(300000.0, 0.0, n=1)}}}
    rows = [("r", "ev", "EV"), ("r", "tokens", "tokens")]
    out = R.results_table(res, rows, tmp_path / "t.md", tmp_path / "t.tex")
    md, tex = out["md"].read_text(), out["tex"].read_text()
    assert "| EV | 0.9112 ± 0.0005 | 0.9020 ± 0.0010 | 0.889† |" in md
    assert "| tokens | 300,000 | 300,000 | 300,000† |" in md
    assert r"$0.9112 \pm 0.0005$ & $0.9020 \pm 0.0010$ & $0.889^{\dagger}$" in tex
    assert r"$300{,}000$ & $300{,}000$ & $300{,}000^{\dagger}$" in tex
    assert "± 0 " not in md and "± 0 |" not in md and r"\pm 0$" not in tex
    assert md.rstrip().endswith("† single seed: no standard error")
    assert r"\multicolumn{4}{l}{\footnotesize $^{\dagger}$\,single seed: no standard error} \\" in tex
    assert tex.rstrip().endswith(r"\end{tabular}")
    text = R.text_table(res, rows)
    assert "0.9112 ± 0.0005" in text and "0.889†" in text and text.endswith("no standard error")


@pytest.mark.parametrize("mean, se, n, text, tex", [
    (0.91123, 0.000472, 3, "0.9112 ± 0.0005", r"0.9112 \pm 0.0005"),
    (0.902, 0.00100, 3, "0.9020 ± 0.0010", r"0.9020 \pm 0.0010"),
    (0.5, 0.0096, 3, "0.500 ± 0.010", r"0.500 \pm 0.010"),  # se rounds up to a leading 1: two digits
    (0.5, 0.0151, 3, "0.50 ± 0.02", r"0.50 \pm 0.02"),
    (12345.6, 23.0, 3, "12,350 ± 20", r"12{,}350 \pm 20"),
    (-0.0001, 0.02, 3, "0.00 ± 0.02", r"0.00 \pm 0.02"),  # no "-0.00"
    (1.234e-5, 3.1e-7, 3, "(1.23 ± 0.03)e-5", r"(1.23 \pm 0.03)\times10^{-5}"),  # scientific only when tiny
    (-9.1e-5, 3.2e-5, 3, "-0.00009 ± 0.00003", r"-0.00009 \pm 0.00003"),  # small, yet fixed
    (0.911, 0.0, 1, "0.911†", r"0.911^{\dagger}"),  # one seed: marked, never "± 0"
    (32.0, 0.0, 3, "32.0", "32.0"),  # every seed equal
    (None, 0.1, 3, "n/a", "n/a"),
])
def test_format_mean_se(mean, se, n, text, tex):
    assert R.format_mean_se(mean, se, n) == text
    assert R.format_mean_se(mean, se, n, latex=True) == tex


def test_thousands_are_grouped():
    assert R.format_number(300000) == "300,000" and R.format_number(300000, latex=True) == "300{,}000"
    assert R.format_number(9999) == "9999" and R.format_number(-1234567) == "-1,234,567"
    assert R.format_table([{"arch": "TopK", "train_tok_s": 12345.0}]).splitlines()[1].split() == ["TopK", "12,345"]


def test_rows_are_named_in_words():
    """Every row the notebooks tabulate reads in words: no raw key (``blimp_kept``, ``clause_start k=1``)."""
    from trsae import experiments
    from trsae.evals import measures

    rows = [r for mod in (experiments, measures) for name, v in vars(mod).items() if name.endswith("_ROWS") for r in v]
    nb = json.loads((ROOT / "notebooks" / "04_interpretability.ipynb").read_text())
    params = next("".join(c["source"]) for c in nb["cells"] if "probe_ks =" in "".join(c["source"]))
    env: dict = {}
    exec("\n".join(line for line in params.splitlines() if line.startswith("probe_ks")), env)
    ks = sorted(set(env["probe_ks"]) | {1, 5, 32})  # the smoke ks and those of larger profiles
    nb_rows = [r for table in measures.interp_tables(ks).values() for r in table] + measures.gap_rows(ks)
    assert {"blimp_kept", "clause_start_k1", "gap_probe_k1", "labelled_frac"} <= {r[1] for r in nb_rows}
    for section, key, label in rows + nb_rows:
        words = R.row_label(section, key, label)
        assert "_" not in words and "k=" not in words and words != key, (key, label, words)
    assert R.row_label("probing", "clause_start_k1", "clause_start k=1") == "clause start (k = 1 probe)"
    assert R.row_label("syntax", "blimp_kept", "blimp_kept") == "BLiMP accuracy kept"
    assert set(measures.PROBE_LABELS) <= set(R.PROBE_WORDS)


def test_paper_prints_values_through_pm_macros():
    """paper.tex prints a value over seeds with its generated ``\\<name>Pm`` macro, never a ``\\pm`` of its own
    around a mean and an ``...Se`` macro (which the notebooks no longer write)."""
    tex = (ROOT / "paper" / "paper.tex").read_text()
    assert not re.search(r"\\(setup|base|tmp|abl|interp|overhead)[A-Z][A-Za-z]*Se\b", tex)
    assert "\\pmse" not in tex and re.search(r"\\tmp[A-Za-z]+Pm\b", tex)


def _parse_macros(text):
    return dict(re.findall(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", text, flags=re.M))


def test_macros_round_trip(tmp_path):
    macros = {"trsaeEV": 0.91234, "topkCE": 3.2661, "nTokens": 1234567, "bigValue": 98765.4321,
              "negVal": -0.1234, "modelName": r"Gemma~3 270M", "tinyMse": 0.000123}
    path = R.write_macros(macros, tmp_path / "vars.tex", digits=3)
    got = _parse_macros(path.read_text())
    assert set(got) == set(macros)
    assert got["nTokens"] == "1{,}234{,}567" and got["modelName"] == r"Gemma~3 270M"
    assert got["trsaeEV"] == "0.912" and got["topkCE"] == "3.27" and got["negVal"] == "-0.123"
    assert got["bigValue"] == "98{,}765"
    for k in ("trsaeEV", "topkCE", "bigValue", "negVal"):
        assert float(got[k].replace("{,}", "")) == pytest.approx(macros[k], rel=5e-3)
    m = re.fullmatch(r"\\ensuremath\{(-?[0-9.]+)\\times10\^\{(-?\d+)\}\}", got["tinyMse"])
    assert m and float(m.group(1)) * 10 ** int(m.group(2)) == pytest.approx(0.000123, rel=5e-3)
    assert R.write_macros({"a": 0.5}, path).read_text().count(r"\newcommand") == 1  # overwritten


@pytest.mark.parametrize("name", ["ev1", "trsae_ev", "", "a b", "\\ev", "évalue"])
def test_invalid_macro_names(tmp_path, name):
    with pytest.raises(ValueError):
        R.write_macros({name: 1.0}, tmp_path / "m.tex")
    assert not (tmp_path / "m.tex").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, True])
def test_invalid_macro_values(tmp_path, value):
    with pytest.raises(ValueError):
        R.write_macros({"good": value}, tmp_path / "m.tex")


def test_macro_name_and_format_number():
    assert R.macro_name("trsae", "topk_32", "ev") == "trsaeTopkThreeTwoEv"
    assert R.macro_name("TRSAE w4") == "tRSAEWFour"
    with pytest.raises(ValueError):
        R.macro_name("--")
    assert R.format_number(0.91234) == "0.912"
    assert R.format_number(923.04) == "923"
    assert R.format_number(12345.6) == "12,346"
    assert R.format_number(7) == "7"
    assert R.format_number(0.0) == "0"
    assert R.format_number(None) == "n/a" and R.format_number(math.nan) == "n/a"
    assert R.format_number(0.000123) == "1.23e-4"
    assert R.format_number(0.000123, latex=True) == r"1.23\times10^{-4}"


def test_top_contexts_print_at_the_text_width_in_readable_type(tmp_path):
    """The contexts figure is drawn at the paper's text width (where it is placed, at 100 %), wraps long contexts
    instead of widening, and sets no text below `MIN_FONT_PT`; its heading states the label given."""
    from PIL import Image

    from trsae.report.figures import MIN_FONT_PT, TEXT_WIDTH_IN

    long = {"tokens": [f" token{i}" for i in range(60)], "acts": [i / 60 for i in range(60)], "center": 59}
    ctx = [{"feature": 3, "max_act": 1.0, "examples": [long, long]}, {"feature": 9, "max_act": 2.0, "examples": [long]}]
    path = R.top_contexts_figure(ctx, tmp_path / "top.png", labels={3: "upos=NOUN, F1 0.62, density 0.031"},
                                 fontsize=MIN_FONT_PT + 2)
    with Image.open(path) as im:
        width_in = im.size[0] / im.info["dpi"][0]
        height_in = im.size[1] / im.info["dpi"][1]
    assert width_in <= TEXT_WIDTH_IN * 1.02
    assert height_in > 6 * (MIN_FONT_PT + 2) / 72  # 2 headings and 3 contexts of 60 tokens wrapped onto more lines
    with pytest.raises(ValueError, match="points"):
        R.top_contexts_figure(ctx, tmp_path / "small.png", fontsize=MIN_FONT_PT - 1)


# --------------------------------------------------------------------------------------------- one palette


def test_every_figure_draws_in_the_palette(tmp_path):
    palette = {c.lower() for c in R.PALETTE}
    res = {n: {"probing": {"upos_k1": _leaf(0.5 + i / 10), "upos_k5": _leaf(0.6 + i / 10)}}
           for i, n in enumerate(["clean model", "TopK", "TRSAE"])}
    fig_path = R.probing_figure(res, ["upos"], [1, 5], tmp_path / "probing.png")
    assert fig_path.read_bytes()[:8] == PNG_MAGIC
    ctx = [{"feature": 7, "examples": [{"tokens": ["a", "b\n", "c"], "acts": [0.1, 0.9, 0.2], "center": 1}]}]
    assert R.top_contexts_figure(ctx, tmp_path / "top.png").read_bytes()[:8] == PNG_MAGIC
    figs = [R.make_bar_figure(_results(), R.RECONSTRUCTION_PANELS),
            R.make_frontier_figure({"TopK": [(16, 0.8, 0.0)], "TRSAE": [(16, 0.9, 0.0)]}, "EV")]
    for fig in figs:
        used = {p.get_facecolor() for ax in fig.axes for p in ax.patches} | \
               {ln.get_color() if ln.get_linestyle() != "None" else ln.get_markeredgecolor()
                for ax in fig.axes for ln in ax.get_lines()}  # error-bar caps show only their markers
        hexes = {c.lower() if isinstance(c, str) else "#%02x%02x%02x" % tuple(round(255 * v) for v in c[:3])
                 for c in used}
        assert hexes - {"black", "#000000"} <= palette, hexes - palette


# --------------------------------------------------------------------------------------------- notebook macros


class _Store:
    manifest = {"model": "gemma-3-270m", "layer": 6, "data": "brown+sotu", "token_count": 40000, "ctx_len": 128}
    d_model = 640
    splits = {"test": list(range(12))}


class _Train:
    tokens = 40000
    dead_window_frac = 0.1
    batch_size, crop_len, context = 32, 32, 16


def test_notebook_macros_carry_their_files_prefix(tmp_path):
    summary = {"TopK": {"sparsity": {"l0": _leaf(32.0)}}, "TRSAE": {"sparsity": {"l0": _leaf(31.0)}}}
    rows = [("sparsity", "l0", "L0")]
    usage = {"per_seed": [{"open_gate_frac": 0.25, "positional_frac": 0.5}]}
    twins = {"TRSAE": {"paired": {"fvu_ratio": _leaf(0.95), "ce_gap_ratio": _leaf(0.9)}}}
    made = {
        R.SETUP: R.setup_macros("smoke", _Store(), _Train(), 8, 32, [0, 1], 4, 100_000, 20_000),
        R.BASELINE: R.baseline_macros(summary, rows),
        R.TEMPORAL: R.temporal_macros(summary, rows, usage, 0.1, 10.0, 16, twins,
                                      {"best": "TopK", "second": "TRSAE", "lead": _leaf(0.02), "separated": False}),
        R.OVERHEAD: R.overhead_macros({"trsae_train_ratio": 1.5, "relu_train_ratio": float("nan")}, (8, 16, 128),
                                      640, 32),
    }
    assert set(made[R.SETUP]) == {"setupProfile", "setupModel", "setupLayer", "setupData", "setupHarvestTokens",
                                  "setupCtxLen", "setupTrainTokens", "setupDModel", "setupWidthMult", "setupWidth",
                                  "setupK", "setupSeeds", "setupEvalSeqs", "setupTestSeqs", "setupDensityTokens",
                                  "setupDeadWindowFrac", "setupBatchCrops", "setupCropLen", "setupContext",
                                  "setupReconTokens"}
    assert made[R.SETUP]["setupData"] == "brown + sotu" and made[R.SETUP]["setupTestSeqs"] == 12
    assert made[R.SETUP]["setupReconTokens"] == 20_000 and made[R.SETUP]["setupContext"] == 16
    untuned = R.tuning_macros(None, 4e-4, None, (4e-4, 8e-4), 0.1, 0.1)["setupTuning"]
    tuned = R.tuning_macros({"TopK": 8e-4}, 4e-4, 0.003, (4e-4, 8e-4), 0.1, 0.1)["setupTuning"]
    assert "not tuned" in untuned and "0.0004" in untuned and "validation" in tuned
    assert "searched on the validation split at every rate" in tuned and "the chosen rate's, 0.003." in tuned
    assert "JumpReLU" not in tuned
    assert "JumpReLU's weight on its penalty around \\(k\\), 0.0625," in R.tuning_macros(
        {"JumpReLU": 4e-4}, 4e-4, None, (4e-4,), 0.1, 0.1, jumprelu_l0_coeff=0.0625)["setupTuning"]
    assert made[R.BASELINE] == {"baseTopKLZero": "32.000", "baseTopKLZeroPm": r"\ensuremath{32.000 \pm 0.010}",
                                "baseTRSAELZero": "31.000", "baseTRSAELZeroPm": r"\ensuremath{31.000 \pm 0.010}"}
    assert made[R.TEMPORAL]["tmpOpenGateFrac"] == 0.25 and made[R.TEMPORAL]["tmpWindow"] == 16
    assert made[R.TEMPORAL]["tmpTRSAEFvuRatio"] == "0.950" and made[R.TEMPORAL]["tmpStrongestSeparated"] == R.LEAD_APART[False]
    assert made[R.TEMPORAL]["tmpStrongestLeadPm"] == r"\ensuremath{0.020 \pm 0.010}"
    assert not [m for made_ in made.values() for m in made_ if m.endswith("Se")]
    assert made[R.OVERHEAD] == {"overheadDIn": 640, "overheadK": 32, "overheadWidthMult": 8, "overheadWindow": 16,
                                "overheadCtxLen": 128, "overheadTrainRatio": 1.5}
    for which, macros in made.items():
        path = R.write_macro_file(macros, which, tmp_path)
        assert path.name == which.file and set(_parse_macros(path.read_text())) == set(macros)
    assert _parse_macros((tmp_path / R.SETUP.file).read_text())["setupDensityTokens"] == "100{,}000"
    with pytest.raises(ValueError, match="does not start with 'tmp'"):
        R.write_macro_file({"baseTopKLZero": 1.0}, R.TEMPORAL, tmp_path)
    with pytest.raises(ValueError):
        R.write_macro_file({"tmpx": 1.0}, R.TEMPORAL, tmp_path)  # a capital letter must follow the prefix
    assert len({m.prefix for m in R.MACRO_FILES}) == len({m.file for m in R.MACRO_FILES}) == len(R.MACRO_FILES)


def test_single_seed_macros_are_marked_and_never_plus_minus_zero():
    one = {"TRSAE": {"reconstruction_quality": {"explained_variance": _leaf(0.91123, 0.0, n=1)}}}
    got = R.results_macros(one, R.TEMPORAL, R.RECONSTRUCTION_PANELS[:1])
    assert got == {"tmpTRSAEExplainedVariance": "0.911", "tmpTRSAEExplainedVariancePm": r"\ensuremath{0.911^{\dagger}}"}
    many = {"TRSAE": {"reconstruction_quality": {"explained_variance": _leaf(0.91123, 0.000472)}}}
    got = R.results_macros(many, R.TEMPORAL, R.RECONSTRUCTION_PANELS[:1])
    assert got["tmpTRSAEExplainedVariancePm"] == r"\ensuremath{0.9112 \pm 0.0005}"
    assert got["tmpTRSAEExplainedVariance"] == "0.9112"  # the mean as it is printed beside its se
    neg = R.mean_se_macros("ablDeltaEvWZero", _leaf(-0.0123, 0.0031))
    assert neg == {"ablDeltaEvWZero": r"\ensuremath{-0.012}", "ablDeltaEvWZeroPm": r"\ensuremath{-0.012 \pm 0.003}"}
    with pytest.raises(ValueError):
        R.mean_se_macros("tmpX", _leaf(float("nan")))


def test_every_ablation_is_named_by_what_it_removes():
    from trsae.experiments import ABLATION_COMPONENTS
    from trsae.report.macros import REMOVED

    assert set(REMOVED) == set(ABLATION_COMPONENTS)
    assert not any(words.startswith(("no ", "removing")) for words in REMOVED.values())


def test_a_single_seed_mark_on_a_power_of_ten_is_valid_tex():
    from trsae.report.values import format_mean_se

    text = format_mean_se(0.00012, 0.0, n=1, latex=True)
    assert text == r"{1.20\times10^{-4}}^{\dagger}"  # not 1.20\times10^{-4}^{\dagger}: a double superscript


def test_field_and_decoder_macros_are_named_by_sae_and_written(tmp_path):
    rows = [("sparsity", "l0", "L0"), ("sparsity", "l0_novel", "L0 novel")]
    summary = {"TFA": {"sparsity": {"l0": _leaf(900.0), "l0_novel": _leaf(32.0)}},
               "TRSAE-pred": {"sparsity": {"l0": _leaf(31.0)}}}
    ratio = {"paired": {"fvu_ratio": _leaf(0.8), "ce_gap_ratio": _leaf(0.95)},
             "apart_from_one": {"fvu_ratio": True, "ce_gap_ratio": False}, "ceiling": {"gap_closed": _leaf(0.3)}}
    got = R.field_macros(summary, rows, {"T-SAE": ratio}, "Matryoshka", ratio)
    assert got["tmpFieldTFALZero"] == "900.000" and got["tmpFieldTFALZeroNovel"] == "32.000"
    assert "tmpFieldTRSAEPredLZeroNovel" not in got  # no such value: no macro
    assert got["tmpFieldTSAEFvuRatio"] == "0.800" and got["tmpFieldTSAEFvuRatioSeparated"] == R.FROM_ONE[True]
    assert got["tmpFieldTSAECeGapRatioSeparated"] == "within two standard errors of 1"
    assert got["tmpFieldTSAEGapClosed"] == "0.300" and got["tmpFieldStrongest"] == "Matryoshka"
    assert got["tmpDecoderFvuRatioSeparated"] == "more than two standard errors from 1"
    assert not any("Matched" in m for m in got)  # no frontier given to field_versus: no matched-L0 macros
    matched = {**ratio, "matched": {"fvu_ratio": _leaf(1.1), "ce_gap_ratio": None}}
    with_frontier = R.field_macros(summary, rows, {"TRSAE-pred": matched}, "TopK", ratio)
    assert with_frontier["tmpFieldTRSAEPredMatchedFvuRatio"] == "1.100"
    assert with_frontier["tmpFieldTRSAEPredMatchedCeGapRatioPm"] == "n/a"  # its L0 outside TopK's frontier
    got |= with_frontier
    abl = R.decoder_ablation_macros(ratio, 8)
    assert abl["ablDecoderPredK"] == 8 and abl["ablDecoderCeGapRatio"] == "0.950"
    for which, macros in ((R.TEMPORAL, got), (R.ABLATION, abl)):
        assert set(_parse_macros(R.write_macro_file(macros, which, tmp_path).read_text())) == set(macros)


def test_ce_split_macros_name_the_first_and_last_buckets_and_each_frequency_class():
    def leaves(r):
        return {"ratio": {"mean": r, "se": 0.01, "n": 2}, "gap_share": {"mean": 0.5, "se": 0.0, "n": 2},
                "token_share": {"mean": 0.25, "se": 0.0, "n": 2}}
    split = {"by_position": {"1": leaves(0.8), "2-3": leaves(0.9), "64-127": leaves(1.1)},
             "by_frequency": {"frequent": leaves(1.0), "middle": leaves(0.95), "rare": leaves(float("nan"))}}
    m = R.ce_split_macros(split)
    assert m["tmpCeSplitFirstBucket"] == "1" and m["tmpCeSplitLastBucket"] == "64--127"
    assert m["tmpCeSplitFirstRatio"] == "0.800" and m["tmpCeSplitLastRatio"] == "1.100"
    assert m["tmpCeSplitMiddleRatio"] == "0.950" and m["tmpCeSplitRareRatioPm"] == "n/a"
    assert m["tmpCeSplitFrequentGapShare"] == "0.500"
