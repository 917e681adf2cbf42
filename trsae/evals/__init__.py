"""Offline evaluations beyond the core metrics: probing, syntax, discourse and automated interpretability.

| module       | holds                                                                                |
| ------------ | ------------------------------------------------------------------------------------ |
| `text`       | tokenise with offsets, batch by length, right-pad, features at every ordinary token  |
| `ud`         | CoNLL-U parsing, UD word -> model-token alignment (`ALIGNMENT`), token-level labels  |
| `probing`    | k-sparse probes (latents chosen on train, C on dev, accuracy / macro-F1 on test)     |
| `syntax`     | token log-probs with an SAE spliced in; BLiMP and Linzen agreement scoring           |
| `syntaxgym`  | SyntaxGym prediction formulas and suites, scored with `syntax`'s core                |
| `discourse`  | GAP: a k-sparse antecedent probe at the pronoun and the model's own name preference  |
| `autointerp` | density, best-label F1, temporal smoothness, top-activating contexts (no API model)  |
| `measures`   | notebook 04's measures of one source (clean model or SAE), its sizes and table rows  |
| `interp`     | notebook 04's measures of the clean model and every SAE, cached; top contexts         |

UD EWT is located through `trsae.data.locate`. BLiMP, SyntaxGym, Linzen agreement and GAP have no download
source in `trsae.data` yet: they are read from ``<data dir>/<folder>`` (`eval_data_dir`), where the data dir is
an explicit argument or ``$TRSAE_DATA_DIR`` (e.g. ``../shared/data``).

This package imports nothing heavy itself; import the submodule you need.
"""

from __future__ import annotations

import os
from pathlib import Path

EVAL_FOLDERS = {
    "blimp": "blimp",
    "syntaxgym": "syntaxgym",
    "linzen": "linzen_agreement",
    "gap": "gap_coreference",
}
"""Evaluation data set -> folder inside a data directory."""

ALIGNMENT = "the last sub-token of each word"
"""How a word (UD, GAP names and pronouns) is represented among the model's tokens (`trsae.evals.ud`)."""

CANONICAL = {
    "blimp": "github alexwarstadt/blimp data/*.jsonl",
    "syntaxgym": "github cpllab/syntactic-generalization test_suites/json/",
    "linzen": "github facebookresearch/colorlessgreenRNNs data/ (subj_agr_filtered.*, generated.*)",
    "gap": "github google-research-datasets/gap-coreference (gap-*.tsv)",
}


def eval_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding evaluation data set ``name`` (a key of `EVAL_FOLDERS`).

    Looks in ``data_dir`` then ``$TRSAE_DATA_DIR``; raises `trsae.data.DataError` saying where it looked and
    what to set when the folder is missing or empty.
    """
    from trsae.data import DataError

    if name not in EVAL_FOLDERS:
        raise DataError(f"unknown evaluation data set {name!r}; known: {', '.join(EVAL_FOLDERS)}")
    folder = EVAL_FOLDERS[name]
    bases = [Path(data_dir)] if data_dir is not None else []
    if os.environ.get("TRSAE_DATA_DIR"):
        bases.append(Path(os.environ["TRSAE_DATA_DIR"]))
    looked = []
    for base in bases:
        d = base / folder
        looked.append(str(d))
        if d.is_dir() and any(d.iterdir()):
            return d
    where = ", ".join(looked) if looked else "nowhere (no data_dir given and TRSAE_DATA_DIR is not set)"
    raise DataError(f"evaluation data {name!r} not found; looked in: {where}. Set TRSAE_DATA_DIR to a mirror "
                    f"holding {folder}/ (e.g. ../shared/data), or pass data_dir=; canonical source: "
                    f"{CANONICAL[name]}")
