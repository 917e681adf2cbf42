"""Where the wall time goes: each phase of the pipeline (harvest, training per SAE family, LM passes, encode-only
passes, density, pursuit, probes, dashboards, ...) adds its seconds to a per-process table, and a notebook writes its
table to ``figures/profile_times.csv`` at its end. Phases nest; time is charged to the innermost one, so the
phases of one notebook add up to (at most) its wall time and nothing is counted twice.

``python -m trsae timing [CSV]`` prints the table; ``./run_all.sh`` (default profile) puts it into the README's
timing section (``--readme``), with the paper's build as one more row.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from trsae.io import atomic_write_text

COLUMNS = ("notebook", "phase", "detail", "seconds", "calls")
F = TypeVar("F", bound=Callable)

_totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
_stack: list[list] = []  # per open phase: [name, start, seconds spent in phases nested in it]


@contextlib.contextmanager
def phase(name: str, detail: str = "") -> Iterator[None]:
    """Charge the wall time of the block, less that of phases nested in it, to the path of open phases
    (``"evaluate > lm forward"``) and ``detail``."""
    start = time.perf_counter()
    _stack.append([name, start, 0.0])
    path = " > ".join(f[0] for f in _stack)
    try:
        yield
    finally:
        _, _, nested = _stack.pop()
        spent = time.perf_counter() - start
        row = _totals[(path, detail)]
        row[0] += spent - nested
        row[1] += 1
        if _stack:
            _stack[-1][2] += spent


def timed(name: str) -> Callable[[F], F]:
    """Decorator form of `phase`."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


def totals() -> dict[tuple[str, str], tuple[float, int]]:
    """``{(phase, detail): (seconds, calls)}`` so far in this process."""
    return {k: (v[0], int(v[1])) for k, v in _totals.items()}


def reset() -> None:
    if _stack:
        raise RuntimeError("timing.reset() inside an open phase")
    _totals.clear()


def read(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and tuple(rows[0]) != COLUMNS:
        raise ValueError(f"{p} is not a timing table (columns {tuple(rows[0])}, expected {COLUMNS})")
    return [dict(r, seconds=float(r["seconds"]), calls=int(r["calls"])) for r in rows]


def write(path: str | os.PathLike, notebook: str, wall_s: float | None = None) -> list[dict]:
    """Replace ``notebook``'s rows of the table at ``path`` with this process's totals (and, given ``wall_s``, an
    ``other`` row for the wall time no phase claimed); rows of other notebooks stay. Written atomically."""
    rows = [r for r in read(path) if r["notebook"] != notebook]
    mine = [{"notebook": notebook, "phase": ph, "detail": d, "seconds": s, "calls": n}
            for (ph, d), (s, n) in sorted(totals().items())]
    if wall_s is not None:
        claimed = sum(r["seconds"] for r in mine)
        mine.append({"notebook": notebook, "phase": "other", "detail": "", "seconds": max(wall_s - claimed, 0.0),
                     "calls": 1})
    rows += mine
    _write_rows(path, rows)
    return rows


def _write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows([r["notebook"], r["phase"], r["detail"], f"{r['seconds']:.1f}", r["calls"]] for r in rows)
    atomic_write_text(path, buf.getvalue())


def summary(rows: list[dict]) -> str:
    """A Markdown table: seconds per notebook and innermost phase (``harvest > lm forward`` and
    ``evaluate > lm forward`` are both LM forwards; details summed), largest first."""
    by: dict[tuple[str, str], float] = defaultdict(float)
    for r in rows:
        by[(r["notebook"], r["phase"].split(" > ")[-1])] += r["seconds"]
    notebooks = sorted({nb for nb, _ in by})
    phases = sorted({ph for _, ph in by}, key=lambda ph: -sum(v for (nb, p), v in by.items() if p == ph))
    out = ["| phase | " + " | ".join(notebooks) + " | total |", "|---" * (len(notebooks) + 2) + "|"]
    for ph in phases:
        vals = [by.get((nb, ph), 0.0) for nb in notebooks]
        out.append(f"| {ph} | " + " | ".join(f"{v:,.0f}" for v in vals) + f" | {sum(vals):,.0f} |")
    tot = [sum(v for (nb, _), v in by.items() if nb == n) for n in notebooks]
    out.append("| **total** | " + " | ".join(f"{v:,.0f}" for v in tot) + f" | {sum(tot):,.0f} |")
    return "\n".join(out)


BEGIN, END = "<!-- timing: written by `python -m trsae timing --readme`; do not edit by hand -->", "<!-- /timing -->"


def record(path: str | os.PathLike, notebook: str, phase_name: str, seconds: float) -> list[dict]:
    """Replace ``notebook``'s rows with one row (e.g. ``paper``, timed by ``run_all.sh``)."""
    rows = [r for r in read(path) if r["notebook"] != notebook]
    rows.append({"notebook": notebook, "phase": phase_name, "detail": "", "seconds": float(seconds), "calls": 1})
    _write_rows(path, rows)
    return rows


def write_readme(readme: str | os.PathLike, rows: list[dict], label: str, source: str) -> None:
    """Put `summary` of ``rows`` (read from ``source``; ``label`` says what was run) between the README's timing
    markers."""
    p = Path(readme)
    text = p.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{p} needs exactly one pair of timing markers:\n{BEGIN}\n{END}")
    total = sum(r["seconds"] for r in rows)
    intro = textwrap.fill(f"Seconds per phase of {label}, {total:,.0f} s in all (`{source}`; each phase's own "
                          f"time, without the phases nested in it):", width=120)
    block = f"{BEGIN}\n{intro}\n\n{summary(rows)}\n{END}"
    head, rest = text.split(BEGIN)
    atomic_write_text(p, head + block + rest.split(END, 1)[1])
