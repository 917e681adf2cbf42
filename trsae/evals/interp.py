"""Notebook 04's evaluations, cached like `trsae.runner`'s: `trsae.evals.measures.evaluate_source` of the clean
model and of every trained SAE, each kept as JSON and reused while the model, layer, sizes and code are unchanged.

    work/interp/clean-<model>-L<layer>-<hash>.json    the clean model's result and its GAP name preference
    work/runs/<label>-<hash>/interp-L<layer>-<hash>.json    an SAE's result, in its run folder

The hash is `trsae.config.config_hash` of the model's name and dtype, the layer, the `EvalSizes` and
`trsae.runner.code_version` (the run folder names the SAE). An SAE's result depends on the clean model's (the
share of its accuracy kept, the agreement of GAP preferences), which those same keys determine.

What is cached is the JSON part of a result (`measures.public`), and for the clean model its GAP preference (the
margins an SAE's agreement is measured against). The other working objects are not: the UD test split's features
(every token's codes, tens of MB at the cpu profile) and each feature's best label serve only the top-contexts
figure, of one SAE, so `top_contexts` recomputes them for that SAE alone, with the evaluation's own call
(`measures.ud_test_features`), which gives the same features; a cached result can then never go with features
of another SAE or size. Results are returned as read back from their JSON (NaN restored where JSON holds null),
so a first run and a cached rerun give the same values, as `trsae.runner.Evaluator`'s do.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from trsae.config import config_hash
from trsae.evals import autointerp, measures
from trsae.evals.measures import EvalSizes
from trsae.evals.text import reuse_layer_acts
from trsae.io import write_json_atomic
from trsae.lm import LoadedModel
from trsae.metrics import aggregate_seeds
from trsae.report.interp import TopContexts
from trsae.runner import code_version
from trsae.saes import SAE
from trsae.timing import phase

CLEAN = "clean model"
"""The clean model's name in `summarize`'s summary (its first column)."""


def cache_key(model: LoadedModel, layer: int, sizes: EvalSizes) -> str:
    """The hash of everything a notebook-04 result depends on besides its SAE (module docstring)."""
    return config_hash({"model": model.name, "dtype": str(model.dtype), "layer": layer, "sizes": sizes.to_dict(),
                        "code": code_version()})


def clean_path(work: str | os.PathLike, model: LoadedModel, layer: int, sizes: EvalSizes) -> Path:
    """Where the clean model's result is cached under the current code."""
    name = re.sub(r"[^\w.-]+", "-", Path(model.name).name)
    return Path(work) / "interp" / f"clean-{name}-L{layer}-{cache_key(model, layer, sizes)}.json"


def run_path(run: str | os.PathLike, model: LoadedModel, layer: int, sizes: EvalSizes) -> Path:
    """Where an SAE's result is cached in its run folder under the current code."""
    return Path(run) / f"interp-L{layer}-{cache_key(model, layer, sizes)}.json"


def _nan(obj: Any) -> Any:
    """JSON's nulls back to the NaN they were written from (`trsae.io.to_jsonable`)."""
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan(v) for v in obj]
    return math.nan if obj is None else obj


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    if not path.exists():
        write_json_atomic(path, compute())
    return _nan(json.loads(path.read_text()))


def interp_results(model: LoadedModel, layer: int, trained: dict[str, list[tuple[Path, SAE]]], sizes: EvalSizes,
                   work: str | os.PathLike) -> tuple[dict, dict[str, list[dict]]]:
    """`measures.evaluate_source` of the clean model and of every SAE of ``trained`` (`trsae.runner.train_all`'s
    ``{name: [(run folder, sae), ...]}``) at ``layer``, each cached (module docstring); only the uncached ones are
    evaluated, sharing the model's activations of each text (`reuse_layer_acts`). Returns the JSON parts
    (`measures.public`): ``(clean, {name: [per-seed result, ...]})``."""
    with reuse_layer_acts():
        def evaluate_clean() -> dict:
            res = measures.evaluate_source(model, layer, None, sizes, None)
            return {"result": measures.public(res), "gap_pref": res["_gap_pref"]}

        cached = _cached(clean_path(work, model, layer, sizes), evaluate_clean)
        clean = {**cached["result"], "_gap_pref": cached["gap_pref"]}  # what an SAE's evaluation reads of it
        runs: dict[str, list[dict]] = {}
        for name, rs in trained.items():
            runs[name] = []
            for run, sae in rs:
                def evaluate_sae(sae: SAE = sae) -> dict:
                    return measures.public(measures.evaluate_source(model, layer, sae, sizes, clean))

                runs[name].append(_cached(run_path(run, model, layer, sizes), evaluate_sae))
    return cached["result"], runs


def summarize(clean: dict, runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean ± standard error over seeds (`trsae.metrics.aggregate_seeds`) of `interp_results`' output: the clean
    model (`CLEAN`) first, then each SAE."""
    return {CLEAN: aggregate_seeds([clean]), **{name: aggregate_seeds(rs) for name, rs in runs.items()}}


def top_contexts(model: LoadedModel, layer: int, name: str, sae: SAE, sizes: EvalSizes, n: int = 6) -> TopContexts:
    """The top-activating contexts on UD EWT test (`autointerp.top_contexts`) of the ``n`` features of ``sae``
    (called ``name``) with the highest best-label F1, one per label (`autointerp.pick_features`), with those
    labels and their page. Its features are recomputed, not cached (module docstring)."""
    feats = measures.ud_test_features(model, layer, sae, sizes)
    with phase("autointerp"):
        best = measures.best_labels(feats, model)
        picked = autointerp.pick_features(best, n=n)
        contexts = autointerp.top_contexts(feats.tokens, picked, model.tokenizer)
        labels = autointerp.feature_labels(best, picked)
    html = autointerp.contexts_html(contexts, f"{name}: top-activating contexts (UD EWT test)", labels)
    return TopContexts(contexts=contexts, labels=labels, html=html)
