"""The paper refers only to what the notebooks produce (trsae.paper), and it compiles.

Unit tests use small hand-written TeX snippets in a temporary ``paper/`` + ``figures/`` pair. The tests marked
``paper`` look at the real ``paper/paper.tex``: one checks it against ``figures/`` (skipped until the notebooks
have written macro files there), one compiles it with placeholder figures in a temporary copy (skipped without
latexmk). Neither ever writes into the checkout's ``figures/``.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from trsae import paper as P
from trsae.report.macros import MACRO_FILES

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "paper" / "paper.tex"
FIGURES = Path(os.environ.get("TRSAE_FIGURES_DIR", ROOT / "figures"))  # where the notebooks wrote

PREAMBLE = r"""\documentclass{article}
\newcommand{\IfMacro}[3]{\ifcsname #1\endcsname #2\else #3\fi}
\newcommand{\tmpOwn}{defined here}
\input{../figures/tmp_macros.tex}
\IfFileExists{../figures/abl_macros.tex}{\input{../figures/abl_macros.tex}}{}
\begin{document}
"""


def _project(tmp_path: Path, body: str, files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """tmp/paper/paper.tex (PREAMBLE + body) and tmp/figures/ holding ``files`` (name -> text)."""
    paper, figures = tmp_path / "paper", tmp_path / "figures"
    paper.mkdir()
    figures.mkdir()
    for name, text in (files or {}).items():
        (figures / name).parent.mkdir(parents=True, exist_ok=True)
        (figures / name).write_text(text)
    tex = paper / "paper.tex"
    tex.write_text(PREAMBLE + body + "\n\\end{document}\n")
    return tex, figures


TMP_MACROS = "% generated\n\\newcommand{\\tmpTRSAEEv}{0.5}\n\\newcommand{\\tmpTRSAEEvSe}{0.01}\n"


# --------------------------------------------------------------------------------------------- units


def test_consistent_snippet_has_no_problems(tmp_path):
    tex, figures = _project(tmp_path, r"EV $\tmpTRSAEEv \pm \tmpTRSAEEvSe$, \tmpOwn. "
                                      r"\includegraphics[width=0.5\linewidth]{../figures/a.png}",
                            {"tmp_macros.tex": TMP_MACROS, "a.png": "png"})
    assert P.check_paper(tex, figures) == []


def test_check_paper_command_refuses_an_undefined_macro(tmp_path, capsys):
    """`python -m trsae check-paper` (what ./run_all.sh runs before latexmk) exits 2 naming the problem, 0 when clean."""
    from trsae.__main__ import main

    tex, figures = _project(tmp_path, r"EV $\tmpTRSAEEv$ and $\tmpNowhere$.", {"tmp_macros.tex": TMP_MACROS})
    assert main(["check-paper", str(tex), str(figures)]) == 2
    assert "tmpNowhere" in capsys.readouterr().err
    tex.write_text(tex.read_text().replace(r" and $\tmpNowhere$", ""))
    assert main(["check-paper", str(tex), str(figures)]) == 0


def test_missing_figure_is_reported(tmp_path):
    tex, figures = _project(tmp_path, r"\includegraphics[width=\linewidth]{../figures/nope.png}",
                            {"tmp_macros.tex": TMP_MACROS})
    problems = P.check_paper(tex, figures)
    assert len(problems) == 1 and "missing file" in problems[0] and "nope.png" in problems[0]


def test_missing_table_and_extensionless_input_are_reported(tmp_path):
    tex, figures = _project(tmp_path, r"\input{../figures/table.tex} \input{../figures/other}",
                            {"tmp_macros.tex": TMP_MACROS})
    problems = P.check_paper(tex, figures)
    assert len(problems) == 2
    assert any("table.tex" in p for p in problems) and any("other.tex" in p for p in problems)


def test_missing_macro_file_is_reported(tmp_path):
    tex, figures = _project(tmp_path, "text")
    problems = P.check_paper(tex, figures)
    assert problems == [p for p in problems if "missing file" in p] and "tmp_macros.tex" in problems[0]


def test_undefined_macro_is_reported(tmp_path):
    tex, figures = _project(tmp_path, r"EV \tmpTRSAEEv{} and CE \tmpTRSAECe{}.", {"tmp_macros.tex": TMP_MACROS})
    problems = P.check_paper(tex, figures)
    assert len(problems) == 1 and "undefined macro" in problems[0] and "\\tmpTRSAECe " in problems[0]


def test_guarded_section_is_not_checked_until_its_file_exists(tmp_path):
    body = (r"\IfFileExists{../figures/abl_macros.tex}{Delta \ablDelta{}; "
            r"\includegraphics{../figures/abl_fig.png} \input{../figures/abl_table.tex}}{not run in this build}")
    tex, figures = _project(tmp_path, body, {"tmp_macros.tex": TMP_MACROS})
    assert P.check_paper(tex, figures) == []
    # once the guard file exists, its body must resolve: the macro, figure and table are now required
    (figures / "abl_macros.tex").write_text("\\newcommand{\\ablOther}{1}\n")
    problems = P.check_paper(tex, figures)
    assert len(problems) == 3
    assert any("\\ablDelta " in p for p in problems)
    assert any("abl_fig.png" in p for p in problems) and any("abl_table.tex" in p for p in problems)
    (figures / "abl_macros.tex").write_text("\\newcommand{\\ablDelta}{-0.1}\n")
    (figures / "abl_fig.png").write_text("png")
    (figures / "abl_table.tex").write_text("\\begin{tabular}{l}x\\end{tabular}\n")
    assert P.check_paper(tex, figures) == []


def test_else_branch_of_a_guard_is_checked_when_the_file_is_missing(tmp_path):
    body = r"\IfFileExists{../figures/abl_macros.tex}{\ablDelta}{only \tmpMissing{} here}"
    tex, figures = _project(tmp_path, body, {"tmp_macros.tex": TMP_MACROS})
    problems = P.check_paper(tex, figures)
    assert len(problems) == 1 and "\\tmpMissing " in problems[0]


def test_optional_macro_guard(tmp_path):
    body = r"\IfMacro{tmpMem}{memory \tmpMem{} and \tmpMemSe}{}"
    tex, figures = _project(tmp_path, body, {"tmp_macros.tex": TMP_MACROS})
    assert P.check_paper(tex, figures) == []
    (figures / "tmp_macros.tex").write_text(TMP_MACROS + "\\newcommand{\\tmpMem}{2}\n")
    problems = P.check_paper(tex, figures)
    assert len(problems) == 1 and "\\tmpMemSe " in problems[0]


def test_nested_guards(tmp_path):
    body = (r"\IfFileExists{../figures/abl_macros.tex}{\IfMacro{ablMem}{\ablMem}{\ablNoMem}}{}")
    tex, figures = _project(tmp_path, body, {"tmp_macros.tex": TMP_MACROS,
                                             "abl_macros.tex": "\\newcommand{\\ablMem}{1}\n"})
    assert P.check_paper(tex, figures) == []
    (figures / "abl_macros.tex").write_text("\\newcommand{\\ablOther}{1}\n")
    assert [p for p in P.check_paper(tex, figures) if "\\ablNoMem " in p]


def test_commented_out_references_are_ignored(tmp_path):
    body = "% \\includegraphics{../figures/gone.png} \\tmpGone\ntext 50\\% % 0.91\n"
    tex, figures = _project(tmp_path, body, {"tmp_macros.tex": TMP_MACROS})
    problems = P.check_paper(tex, figures)
    assert len(problems) == 1 and "hand-typed" in problems[0] and "'50" in problems[0]


def test_macro_defined_twice_is_reported(tmp_path):
    tex, figures = _project(tmp_path, r"\tmpTRSAEEv", {"tmp_macros.tex": TMP_MACROS,
                                                       "z_macros.tex": "\\newcommand{\\tmpTRSAEEv}{0.6}\n"})
    problems = P.check_paper(tex, figures)
    assert len(problems) == 1 and "several macro files" in problems[0]


def test_hand_typed_numbers():
    found = P.hand_typed_numbers(
        "\\usepackage[margin=1in]{geometry}\n\\begin{document}\n"
        "EV 0.91, 4,390 tok/s, 25 features, 7\\%; "
        "fine: GPT-2, Gemma-2-2B, L0, F1, one seed, $x_1$, $(0, 1)$, \\texttt{03\\_ablations}, "
        "\\cite{gao2024scaling}, \\label{sec:a12}, \\includegraphics[width=0.5\\linewidth]{../figures/f12.png}, "
        "\\vspace{12pt}, \\resizebox{0.9\\linewidth}{!}{x}, \\begin{tabular}{l}\\end{tabular}\n\\end{document}")
    assert found == ["0.91", "4,390", "25", "7\\%"]


def test_referenced_and_used_and_defined(tmp_path):
    body = (r"\tmpTRSAEEv \IfFileExists{../figures/abl_macros.tex}{\ablDelta}{} \baselineskip"
            r" \includegraphics[width=1cm]{../figures/sub/fig} \input{../figures/t.tex}")
    tex, figures = _project(tmp_path, body, {"tmp_macros.tex": TMP_MACROS, "sub/fig.pdf": "pdf"})
    refs = P.referenced_files(tex)
    assert {str((figures / n).resolve()) for n in ("tmp_macros.tex", "abl_macros.tex", "sub/fig.pdf", "t.tex")} \
        == {str(Path(r).resolve()) for r in refs}
    # own definition (\tmpOwn) and LaTeX's \baselineskip are not generated macros
    assert P.used_macros(tex) == {"tmpTRSAEEv", "ablDelta"}
    assert P.defined_macros(figures) == {"tmpTRSAEEv", "tmpTRSAEEvSe"}
    assert P.defined_macros(tmp_path / "nowhere") == set()


def test_macro_names_from_report_are_recognised(tmp_path):
    """What trsae.report.write_macros writes is what defined_macros reads."""
    from trsae.report import macro_name, write_macros

    names = {macro_name("tmp", "TopK-wide", "explained_variance"), macro_name("setup", "harvest_tokens"),
             macro_name("base", "ReLU-L1", "l0", "se")}
    write_macros({n: 1.0 for n in names} | {"setupModel": "gemma-3-270m"}, tmp_path / "x_macros.tex")
    assert P.defined_macros(tmp_path) == names | {"setupModel"}


# --------------------------------------------------------------------------------------------- the real paper


@pytest.mark.paper
def test_paper_refers_only_to_what_notebooks_produce(tmp_path):
    """The real paper against the real figures/: every file it includes exists, every generated macro it uses is
    defined, no number is typed. Run after the notebooks (run_all.sh / CI); skipped before they have run."""
    if not list(FIGURES.glob("*macros.tex")):
        pytest.skip("figures/ holds no *macros.tex yet: run the notebooks (./run_all.sh --profile smoke) first")
    tex = P.stage(FIGURES, tmp_path)  # ../figures/ of the staged copy is FIGURES (smoke outputs in CI)
    problems = P.check_paper(tex, tmp_path / "figures")
    assert not problems, f"paper/paper.tex does not match {FIGURES}:\n" + "\n".join(problems)


@pytest.mark.paper
def test_paper_builds_from_the_notebooks_outputs(tmp_path):
    """The real paper compiles against the figures the notebooks wrote (in CI: the smoke profile's)."""
    if shutil.which("latexmk") is None:
        pytest.skip("latexmk not installed: apt-get install latexmk texlive-latex-recommended texlive-latex-extra")
    if not list(FIGURES.glob("*macros.tex")):
        pytest.skip("no notebook outputs yet: run the notebooks first")
    pdf = P.build_pdf(FIGURES, tmp_path)
    assert pdf.stat().st_size > 10_000
    wide = P.overfull_boxes(pdf.with_suffix(".log").read_text(errors="replace"))
    assert not wide, f"boxes past the text block by more than {P.OVERFULL_LIMIT_PT} pt:\n" + "\n".join(wide)
    small = P.figure_font_problems(pdf.with_suffix(".tex"))
    assert not small, "figures whose text prints too small:\n" + "\n".join(small)


def test_figure_fonts_are_read_at_the_size_the_paper_prints_them(tmp_path):
    from matplotlib.figure import Figure

    from trsae.report.figures import FONT_KEY, min_font_pt, save_figure

    fig = Figure(figsize=(5.0, 2.0))
    ax = fig.subplots()
    ax.tick_params(labelsize=9)
    ax.set_title("title", fontsize=12)
    fig.text(0.5, 0.5, "note", fontsize=8)
    assert min_font_pt(fig) == 8
    (tmp_path / "figures").mkdir()
    png = save_figure(fig, tmp_path / "figures" / "f.png", dpi=100)
    from PIL import Image
    with Image.open(png) as im:
        natural_in = im.width / im.info["dpi"][0]
        assert im.info[FONT_KEY] == "8.00"
    _png_file = tmp_path / "figures" / "bare.png"
    _png_file.write_bytes(_png())
    (tmp_path / "paper").mkdir()
    tex = tmp_path / "paper" / "paper.tex"
    tex.write_text("\\includegraphics{../figures/f.png}\n"
                   "\\includegraphics[width=0.5\\linewidth]{../figures/f}\n"
                   "\\includegraphics[width=\\linewidth,height=0.1\\textheight,keepaspectratio]{../figures/f.png}\n"
                   "% \\includegraphics{../figures/commented.png}\n"
                   "\\includegraphics[width=2in]{../figures/bare.png}\n")
    got = P.figure_fonts(tex)
    assert [Path(p).name for p, _ in got] == ["f.png", "f.png", "f.png", "bare.png"]
    assert got[0][1] == pytest.approx(8.0)  # its own size
    assert got[1][1] == pytest.approx(8.0 * 0.5 * 6.5 / natural_in, rel=1e-3)
    with Image.open(png) as im:
        height_in = im.height / im.info["dpi"][1]
    assert got[2][1] == pytest.approx(8.0 * min(6.5 / natural_in, 0.9 / height_in), rel=1e-3)
    assert got[3][1] is None
    problems = P.figure_font_problems(tex)
    assert len(problems) == 3 and "bare.png: records no font" in problems[-1]  # placements 2 and 3 print too small
    assert all("below 6 pt" in p for p in problems[:2])


def test_overfull_boxes_past_the_limit_are_found():
    log = ("Overfull \\hbox (438.2pt too wide) in paragraph at lines 1--6\n"
           "Overfull \\hbox (3.1pt too wide) in paragraph at lines 8--9\n"
           "Overfull \\vbox (12.0pt too high) has occurred while \\output is active\n"
           "Underfull \\hbox (badness 10000) in paragraph at lines 9--9\n")
    assert P.overfull_boxes(log) == ["Overfull \\hbox (438.2pt too wide) in paragraph at lines 1--6",
                                     "Overfull \\vbox (12.0pt too high) has occurred while \\output is active"]
    assert P.overfull_boxes(log, limit=500) == []


def _png(width: int = 4, height: int = 3) -> bytes:
    """A valid grey PNG of ``width`` x ``height`` pixels (4:3, so that placeholder figures take a plausible size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


MACRO_FILE_PREFIX = {m.file: m.prefix for m in MACRO_FILES}
OPTIONAL = ("ablation_", "interp_")  # files of the guarded sections (03_ablations, 04_interpretability)


def stub_figures(tex: Path, figures: Path, guarded: bool = True) -> None:
    """Placeholders for everything ``tex`` refers to, written into ``figures`` (a temporary folder): each macro
    file defines the used macros of its prefix as the word "stub", PNGs are 1x1, tables one row.
    ``guarded=False`` leaves out the optional sections' files (the build before 03 and 04 have run)."""
    figures.mkdir(parents=True, exist_ok=True)
    used = sorted(P.used_macros(tex))
    for r in P.referenced_files(tex):
        f = Path(r)
        if not guarded and f.name.startswith(OPTIONAL):
            continue
        if f.name in MACRO_FILE_PREFIX:
            prefix = MACRO_FILE_PREFIX[f.name]
            lines = [f"\\newcommand{{\\{m}}}{{stub}}" for m in used if m.startswith(prefix)]
            (figures / f.name).write_text("\n".join(lines) + "\n")
        elif f.suffix == ".png":
            (figures / f.name).write_bytes(_png())
        elif f.suffix == ".tex":
            (figures / f.name).write_text("\\begin{tabular}{lr}\n\\hline\nstub & stub \\\\\n\\hline\n\\end{tabular}\n")
        else:
            raise AssertionError(f"no placeholder for {f}")


@pytest.mark.paper
@pytest.mark.slow
@pytest.mark.parametrize("guarded", [False, True], ids=["before-03-04", "all-notebooks"])
def test_paper_compiles_with_placeholder_figures(tmp_path, guarded):
    """paper.tex compiles (latexmk -pdf) against placeholder figures in a temporary copy, with and without the
    optional sections' files. Skipped where no LaTeX toolchain is installed (see paper/README.md)."""
    if shutil.which("latexmk") is None or shutil.which("pdflatex") is None:
        pytest.skip("latexmk/pdflatex not installed: apt-get install latexmk texlive-latex-recommended "
                    "texlive-latex-extra")
    shutil.copytree(ROOT / "paper", tmp_path / "paper", ignore=shutil.ignore_patterns(
        "*.pdf", "*.aux", "*.log", "*.bbl", "*.blg", "*.out", "*.fls", "*.fdb_latexmk", "*.synctex.gz"))
    tex = tmp_path / "paper" / "paper.tex"
    stub_figures(tex, tmp_path / "figures", guarded=guarded)
    assert P.check_paper(tex, tmp_path / "figures") == []
    run = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"],
                         cwd=tex.parent, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    assert (tex.parent / "paper.pdf").stat().st_size > 0
    log = (tex.parent / "paper.log").read_text(errors="replace")
    assert not re.search(r"Citation `[^']*' on page \d+ undefined", log), "undefined citation"
    assert not re.search(r"Reference `[^']*' on page \d+ undefined", log), "undefined reference"


YES_NO = re.compile(r"\\(\w+Separated)\b(?:\{\})?")
"""A macro of `trsae.report.macros` that holds one of two clauses (`FROM_ONE`, `LEAD_APART`)."""


def _render(paragraph: str, values: dict[str, str]) -> str:
    """A paragraph of paper.tex as plain words: the yes/no macros set to ``values``, every other macro to a number,
    references and TeX markup dropped."""
    text = YES_NO.sub(lambda m: values[m.group(1)], paragraph)
    text = re.sub(r"\\(ref|label|cite\w*)\{[^}]*\}", "", text)
    text = re.sub(r"\\[A-Za-z]+(\{\})?", "0.5", text)
    return re.sub(r"\s+", " ", re.sub(r"[{}$~\\]", " ", text))


def test_yes_no_clauses_read_as_prose_either_way():
    """Every paragraph of the paper with a yes/no macro, rendered for every combination of its macros' outcomes: no
    word doubled, no parenthesis holding a bare verdict ("(more)", "(misses)"), and no clause macro followed by the
    "than two standard errors" that the one-word macros needed."""
    import itertools

    from trsae.report.macros import FROM_ONE, LEAD_APART

    paragraphs = [p for p in re.split(r"\n\s*\n", PAPER.read_text()) if YES_NO.search(p)]
    assert paragraphs, "paper.tex uses no yes/no macro: update this test"
    for paragraph in paragraphs:
        names = sorted({m.group(1) for m in YES_NO.finditer(paragraph)} - {"ablSeparatedFromZero"})
        for outcome in itertools.product((True, False), repeat=len(names)):
            values = {n: (LEAD_APART if n == "tmpStrongestSeparated" else FROM_ONE)[o] for n, o in zip(names, outcome)}
            text = _render(paragraph, values | {"ablSeparatedFromZero": "the gates"})
            assert not re.search(r"\b(\w+) \1\b", text, re.I), text
            assert not re.search(r"\(\s*(not )?(more|misses|meets)\s*\)", text), text
            assert not re.search(r"(errors|of 1|from 1|zero) than two standard errors", text), text
