"""Notebook 04's files: its results JSON, four tables, the probing figure, one SAE's top-activating contexts (page
and figure) and its macros. Plain data in, so that this module, like the rest of the package, imports no torch:
`trsae.evals.interp` computes (and caches) what goes in, `trsae.evals.measures` names the tables' rows."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trsae.io import atomic_write_text, write_json_atomic
from trsae.report.figures import probing_figure, top_contexts_figure
from trsae.report.macros import INTERP, interp_macros, write_macro_file
from trsae.report.tables import results_table
from trsae.report.values import Panel

INTERP_TABLES = ("syntax", "discourse", "probing")
"""The tables over every source, clean model included (``interp_<name>_table.{md,tex}``); the ``autointerp``
table has the SAEs only (``interp_autointerp_table.tex``)."""


@dataclass(frozen=True)
class TopContexts:
    """One SAE's top-activating contexts, as `trsae.evals.interp.top_contexts` draws them."""

    contexts: list[dict]
    """`trsae.evals.autointerp.top_contexts` of the picked features."""
    labels: dict[int, str]
    """Feature -> its best label, F1 and density in words (`trsae.evals.autointerp.feature_labels`)."""
    html: str
    """The page of them (`trsae.evals.autointerp.contexts_html`)."""


def write_interp(figures: str | os.PathLike, summary: dict[str, dict], clean: dict, per_seed: dict[str, list[dict]],
                 sizes: Mapping[str, Any], tables: Mapping[str, Sequence[Panel]], probe_labels: Sequence[str],
                 top: TopContexts) -> Path:
    """Everything notebook 04 writes into ``figures``, from its results (the clean model's ``clean`` and each SAE's
    ``per_seed``, their ``summary`` over seeds, the clean model first) and its evaluation ``sizes``
    (`trsae.evals.measures.EvalSizes.to_dict`): ``interp_results.json``; ``interp_<name>_table.*`` of the rows
    ``tables[name]`` (`trsae.evals.measures.interp_tables`); ``interp_probing.png`` (each of ``probe_labels`` at
    every probe k); ``interp_top_contexts.{html,png}`` of ``top``; the macro file (`INTERP`). Returns the macro
    file's path."""
    out = Path(figures)
    write_json_atomic(out / "interp_results.json", {"summary": summary, "clean": clean, "per_seed": per_seed})
    for name in INTERP_TABLES:
        results_table(summary, tables[name], path_tex=out / f"interp_{name}_table.tex",
                      path_md=out / f"interp_{name}_table.md")
    results_table({name: summary[name] for name in per_seed}, tables["autointerp"],
                  path_tex=out / "interp_autointerp_table.tex")
    probing_figure(summary, probe_labels, sizes["probe_ks"], out / "interp_probing.png")
    atomic_write_text(out / "interp_top_contexts.html", top.html)
    top_contexts_figure(top.contexts, out / "interp_top_contexts.png", top.labels)
    macros = interp_macros(summary, clean, sizes["probe_ks"], sizes["f1_threshold"], dict(sizes))
    return write_macro_file(macros, INTERP, out)
