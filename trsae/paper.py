"""Checks that the paper refers only to what the notebooks produce. Pure Python (re + pathlib), plus the macro
prefixes of `trsae.report.macros`.

The paper (``paper/paper.tex``) takes every number from macro files (``\\newcommand{\\name}{value}``) and
table / figure files that the notebooks write into ``figures/``. This module reads the TeX source and says:

- `referenced_files`: every ``\\input``, ``\\includegraphics`` and ``\\IfFileExists`` target, resolved
  relative to the folder of the ``.tex`` file (the paper is built from ``paper/``);
- `used_macros`: the generated macros the paper uses (control words starting with one of `PREFIXES` and
  then a capital letter, e.g. ``\\tmpTRSAEExplainedVariance``), less those the paper defines itself;
- `defined_macros`: what ``figures/*macros.tex`` define;
- `check_paper`: a list of problems (empty when the paper is consistent with ``figures/``).

Guards are evaluated the way LaTeX evaluates them, against the files and macros present now:
``\\IfFileExists{F}{yes}{no}`` keeps ``yes`` when F exists, else ``no``; ``\\IfMacro{name}{yes}{no}`` (the
paper's own ``\\ifcsname`` wrapper) keeps ``yes`` when ``\\name`` is defined by a macro file. So a section
whose notebook has not run is not checked, but once its guard file exists everything in it must resolve.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from trsae.report.macros import PREFIXES  # the notebooks' macro prefixes, declared where the macros are made

__all__ = [
    "PREFIXES",
    "GRAPHICS_EXTENSIONS",
    "strip_comments",
    "referenced_files",
    "used_macros",
    "defined_macros",
    "hand_typed_numbers",
    "check_paper",
]


GRAPHICS_EXTENSIONS: tuple[str, ...] = (".pdf", ".png", ".jpg", ".jpeg", ".eps")
"""What ``\\includegraphics{stem}`` without an extension may resolve to (graphicx's order for pdflatex)."""

_COMMENT = re.compile(r"(?<!\\)%.*")
_USED = re.compile(r"\\((?:" + "|".join(PREFIXES) + r")[A-Z][A-Za-z]*)")
_DEFINE = re.compile(r"\\(?:newcommand|renewcommand|providecommand|DeclareRobustCommand)\*?\s*"
                     r"(?:\{\s*\\([A-Za-z]+)\s*\}|\\([A-Za-z]+))"
                     r"|\\(?:def|gdef|edef|xdef|let)\s*\\([A-Za-z]+)")
_FILE_CMD = re.compile(r"\\(input|include|includegraphics)\b\s*\*?")
_GUARDS = ("IfFileExists", "IfMacro")
# arguments that hold names, keys or lengths, not prose: removed before looking for typed numbers
_ONE_ARG = (r"input|include|includegraphics|IfMacro|IfFileExists|label|ref|eqref|autoref|pageref|cref|Cref|"
            r"cite[tp]?\*?|citeauthor|citeyear|bibliography|bibliographystyle|begin|end|[hv]space\*?|url|"
            r"usepackage|documentclass")
_TWO_ARGS = r"resizebox|scalebox|setlength|addtolength|href|newcommand|renewcommand|providecommand"
_NON_PROSE_ARGS = re.compile(r"\\(?:(?:" + _ONE_ARG + r")(?![A-Za-z])\s*(?:\[[^\]]*\]\s*)*(?:\{[^{}]*\})?"
                             r"|(?:" + _TWO_ARGS + r")(?![A-Za-z])\s*(?:\[[^\]]*\]\s*)*(?:\{[^{}]*\}\s*){0,2})")
_OPTIONS = re.compile(r"(?<!\\)\[[^\[\]]*=[^\[\]]*(?<!\\)\]")  # key=value options: [width=0.9\linewidth]
_NUMBER = re.compile(r"(?<![A-Za-z0-9\-\\.])(?:\d+[.,]\d+|\d{2,}|\d+\s*\\?%)(?![A-Za-z0-9]|\\_)")


def strip_comments(text: str) -> str:
    """TeX source without ``%`` comments (an escaped ``\\%`` stays)."""
    return _COMMENT.sub("", text)


def _read(tex_path: str | os.PathLike) -> str:
    return strip_comments(Path(tex_path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------- brace parsing


def _group(text: str, i: int) -> tuple[str, int] | None:
    """The balanced ``{...}`` group starting at the first non-space character at or after ``i``:
    ``(content, index after the closing brace)``, or None if there is no group there."""
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j], j + 1
        j += 1
    raise ValueError(f"unbalanced braces after position {i}: {text[i:i + 60]!r}")


def _guards(text: str):
    """Yield ``(start, end, kind, condition, yes, no)`` for each top-level guard in ``text``."""
    pat = re.compile(r"\\(" + "|".join(_GUARDS) + r")(?![A-Za-z])")
    pos = 0
    while True:
        m = pat.search(text, pos)
        if m is None:
            return
        args, j = [], m.end()
        for _ in range(3):
            g = _group(text, j)
            if g is None:
                break
            args.append(g[0])
            j = g[1]
        if len(args) < 3:  # e.g. the \newcommand{\IfMacro}[3]{...} definition itself
            pos = m.end()
            continue
        yield m.start(), j, m.group(1), args[0].strip(), args[1], args[2]
        pos = j


def _resolve_guards(text: str, holds: Callable[[str, str], bool]) -> str:
    """``text`` with each guard replaced by the branch that ``holds(kind, condition)`` selects (recursively)."""
    out, pos = [], 0
    for start, end, kind, cond, yes, no in _guards(text):
        out.append(text[pos:start])
        out.append(_resolve_guards(yes if holds(kind, cond) else no, holds))
        pos = end
    out.append(text[pos:])
    return "".join(out)


# --------------------------------------------------------------------------------------------- files


def _file_refs(text: str) -> list[tuple[str, str]]:
    """``(command, target)`` for every \\input / \\include / \\includegraphics / \\IfFileExists in ``text``."""
    refs = []
    for m in _FILE_CMD.finditer(text):
        j = m.end()
        while j < len(text) and (text[j].isspace() or text[j] == "["):
            if text[j] == "[":
                j = text.index("]", j) + 1
            else:
                j += 1
        g = _group(text, j)
        if g is not None:
            refs.append((m.group(1), g[0].strip()))
    for m in re.finditer(r"\\IfFileExists(?![A-Za-z])", text):
        g = _group(text, m.end())
        if g is not None:
            refs.append(("IfFileExists", g[0].strip()))
    return refs


def _resolve_path(base: Path, command: str, target: str) -> Path:
    """The file a reference points to, relative to ``base``; an extension-less target is matched the way
    LaTeX does (``.tex`` for \\input, `GRAPHICS_EXTENSIONS` for \\includegraphics); if none exists, the
    first candidate is returned."""
    p = Path(target)
    path = p if p.is_absolute() else base / p
    if path.suffix:
        return path
    exts = GRAPHICS_EXTENSIONS if command == "includegraphics" else (".tex",)
    cands = [path.with_name(path.name + e) for e in exts] + ([path] if command != "includegraphics" else [])
    return next((c for c in cands if c.exists()), cands[0])


def referenced_files(tex_path: str | os.PathLike) -> set[str]:
    """Every ``\\input`` / ``\\include`` / ``\\includegraphics`` / ``\\IfFileExists`` target in the paper, in all
    branches of every guard, resolved relative to the folder of ``tex_path`` and normalised
    (``os.path.normpath``), as strings."""
    tex_path = Path(tex_path)
    base = tex_path.parent
    return {os.path.normpath(_resolve_path(base, cmd, t)) for cmd, t in _file_refs(_read(tex_path))}


# --------------------------------------------------------------------------------------------- macros


def _defined_in(text: str) -> set[str]:
    return {a or b or c for a, b, c in _DEFINE.findall(text)}


def _used_in(text: str) -> set[str]:
    return set(_USED.findall(text))


def used_macros(tex_path: str | os.PathLike) -> set[str]:
    """Generated macros the paper uses, in any branch (names without the backslash): control words starting
    with one of `PREFIXES` followed by a capital letter, less those ``tex_path`` defines itself."""
    text = _read(tex_path)
    return _used_in(text) - _defined_in(text)


def defined_macros(figures_dir: str | os.PathLike) -> set[str]:
    """Macros defined by ``figures_dir/*macros.tex`` (names without the backslash); empty if there are none."""
    return set(_definitions(figures_dir))


def _definitions(figures_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Macro name -> the macro files that define it."""
    out: dict[str, list[str]] = {}
    d = Path(figures_dir)
    if not d.is_dir():
        return out
    for f in sorted(d.glob("*macros.tex")):
        for name in _defined_in(strip_comments(f.read_text(encoding="utf-8"))):
            out.setdefault(name, []).append(f.name)
    return out


# --------------------------------------------------------------------------------------------- typed numbers


def _body(text: str) -> str:
    i = text.find("\\begin{document}")
    return text if i < 0 else text[i + len("\\begin{document}"):]


def hand_typed_numbers(text: str) -> list[str]:
    """Numerals in the document body that look like typed results: decimals (``0.91``, ``4,390``), integers
    of two or more digits, percentages. Comments, the preamble, and the arguments of file, label, citation,
    environment and length commands are ignored, as are numerals glued to a word (``GPT-2``, ``L0``,
    ``Gemma-2-2B``). Single digits pass (write small counts in words anyway)."""
    body = _body(strip_comments(text))
    body = _NON_PROSE_ARGS.sub(" ", body)
    body = _OPTIONS.sub(" ", body)
    return [m.group(0).strip() for m in _NUMBER.finditer(body)]


# --------------------------------------------------------------------------------------------- the check


def check_paper(tex: str | os.PathLike, figures_dir: str | os.PathLike) -> list[str]:
    """Problems that would make the paper show something the notebooks did not produce; [] when none.

    Guards are evaluated against the files present and the macros ``figures_dir/*macros.tex`` define (see
    the module docstring); in what remains, reports: a referenced file that does not exist; a generated
    macro (`used_macros`) that no macro file defines; a macro defined by two macro files (LaTeX would stop
    on the second ``\\newcommand``); a hand-typed number in the text (`hand_typed_numbers`).
    """
    tex = Path(tex)
    base = tex.parent
    text = _read(tex)
    definitions = _definitions(figures_dir)
    defined = set(definitions)
    own = _defined_in(text)

    def holds(kind: str, cond: str) -> bool:
        if kind == "IfFileExists":
            return _resolve_path(base, "input", cond).exists()
        return cond.lstrip("\\") in defined or cond.lstrip("\\") in own

    live = _resolve_guards(text, holds)
    problems = []
    for cmd, target in _file_refs(live):
        if cmd == "IfFileExists":
            continue
        path = _resolve_path(base, cmd, target)
        if not path.exists():
            problems.append(f"missing file: \\{cmd}{{{target}}} -> {os.path.normpath(path)} does not exist")
    for name in sorted(_used_in(live) - own - defined):
        problems.append(f"undefined macro: \\{name} is used by {tex.name} but no {Path(figures_dir).name}/*macros.tex "
                        f"defines it")
    for name, files in sorted(definitions.items()):
        if len(files) > 1:
            problems.append(f"macro \\{name} is defined in several macro files: {', '.join(files)}")
    for num in hand_typed_numbers(live):
        problems.append(f"hand-typed number in {tex.name}: {num!r} (write it into a macro file from a notebook)")
    return problems


def stage(figures_dir: str | os.PathLike, out_dir: str | os.PathLike,
          paper_dir: str | os.PathLike = Path(__file__).resolve().parents[1] / "paper") -> Path:
    """Lay out ``out_dir/paper`` (a copy of paper.tex and references.bib) beside a link ``out_dir/figures`` to
    ``figures_dir``, so that the paper's ``../figures/`` paths point at any set of notebook outputs (smoke,
    cpu) without touching the checkout. Returns the staged paper.tex."""
    import shutil

    out = Path(out_dir)
    (out / "paper").mkdir(parents=True, exist_ok=True)
    for f in ("paper.tex", "references.bib"):
        shutil.copy(Path(paper_dir) / f, out / "paper" / f)
    link = out / "figures"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(figures_dir).resolve(), target_is_directory=True)
    return out / "paper" / "paper.tex"


TEXT_HEIGHT_IN = 9.0
"""``\\textheight`` of the paper's letter page with 1in margins (its width is `trsae.report.figures.TEXT_WIDTH_IN`)."""
_LENGTH = re.compile(r"^\s*([0-9.]*)\s*(\\linewidth|\\textwidth|\\columnwidth|\\textheight|in|cm|mm|pt|bp)\s*$")


def _inches(value: str) -> float:
    from trsae.report.figures import TEXT_WIDTH_IN

    m = _LENGTH.match(value)
    if m is None:
        raise ValueError(f"cannot read the length {value!r} of an \\includegraphics option")
    factor = float(m.group(1) or 1.0)
    unit = {"\\linewidth": TEXT_WIDTH_IN, "\\textwidth": TEXT_WIDTH_IN, "\\columnwidth": TEXT_WIDTH_IN,
            "\\textheight": TEXT_HEIGHT_IN, "in": 1.0, "cm": 1 / 2.54, "mm": 1 / 25.4, "pt": 1 / 72.27,
            "bp": 1 / 72}[m.group(2)]
    return factor * unit


def figure_fonts(tex: str | os.PathLike) -> list[tuple[str, float | None]]:
    """``(file, smallest font in points as printed)`` of every PNG the paper includes (those present): the font
    the figure recorded (`trsae.report.figures.FONT_KEY`) times the scale LaTeX applies, from the PNG's size at
    its own dpi (72 when it names none, as pdfTeX reads it) and the ``width`` / ``height`` options
    (``keepaspectratio``: the smaller scale). None for a PNG that recorded no font."""
    from PIL import Image

    from trsae.report.figures import FONT_KEY

    tex = Path(tex)
    out = []
    for m in re.finditer(r"\\includegraphics(?:\[([^\]]*)\])?\{([^}]*)\}", strip_comments(_read(tex))):
        path = _resolve_path(tex.parent, "includegraphics", m.group(2).strip())
        if path.suffix.lower() != ".png" or not path.exists():
            continue
        with Image.open(path) as im:
            font = im.info.get(FONT_KEY)
            dpi = im.info.get("dpi", (72, 72))
            w_in, h_in = im.width / float(dpi[0]), im.height / float(dpi[1])
        opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in (x.strip() for x in (m.group(1) or "").split(","))
                    if o)
        scales = [_inches(opts[k]) / n for k, n in (("width", w_in), ("height", h_in)) if k in opts]
        scale = (min(scales) if "keepaspectratio" in opts else scales[0]) if scales else 1.0
        out.append((os.path.normpath(path), None if font is None else float(font) * scale))
    return out


def figure_font_problems(tex: str | os.PathLike, min_pt: float | None = None) -> list[str]:
    """Figures whose smallest text prints below ``min_pt`` (default `trsae.report.figures.MIN_FONT_PT`) or that
    recorded no font (`figure_fonts`)."""
    from trsae.report.figures import MIN_FONT_PT

    min_pt = MIN_FONT_PT if min_pt is None else min_pt
    out = []
    for path, pt in figure_fonts(tex):
        if pt is None:
            out.append(f"{path}: records no font size (save it with trsae.report.save_figure)")
        elif pt < min_pt - 1e-6:
            out.append(f"{path}: its smallest text prints at {pt:.1f} pt, below {min_pt:g} pt")
    return out


OVERFULL_LIMIT_PT = 5.0
"""The widest overfull box a built paper may have (points past the text width): beyond it a table or a line runs
visibly into the margin."""


def overfull_boxes(log: str, limit: float = OVERFULL_LIMIT_PT) -> list[str]:
    """The overfull boxes of a LaTeX log wider than ``limit`` points, each as its log line (with the source lines
    it names)."""
    return [m.group(0) for m in re.finditer(r"Overfull \\[hv]box \((\d+(?:\.\d+)?)pt too (?:wide|high)\)[^\n]*", log)
            if float(m.group(1)) > limit]


def build_pdf(figures_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Check and compile the paper against ``figures_dir`` (staged in ``out_dir``, see `stage`)."""
    import subprocess

    tex = stage(figures_dir, out_dir)
    problems = check_paper(tex, tex.parent.parent / "figures")
    if problems:
        raise RuntimeError("paper/paper.tex does not match the figures:\n" + "\n".join(problems))
    run = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"],
                         cwd=tex.parent, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"latexmk failed:\n{run.stdout[-3000:]}")
    return tex.parent / "paper.pdf"
