"""Parameter files: one YAML file per profile, with a section per notebook and a ``shared`` section.

    shared:                  # keys any notebook may declare; each notebook gets those it declares
      harvest: {model: gemma-3-270m, layer: 6, data: brown+sotu, tokens: 600000, ctx_len: 128}
      seeds: [0, 1]
    03_ablations:            # a notebook's own keys, named as in its parameters cell (no prefixes)
      train: {tokens: 100000}    # a mapping is merged into the shared one, key by key
      seeds: [0, 1, 2]

papermill takes one flat mapping per notebook: ``notebook_view`` makes it (``python -m trsae params FILE NB``
prints it as YAML; ``./run_all.sh`` passes it to papermill). Every key must be declared in the notebook's cell
tagged ``parameters``, and a mapping-valued parameter must end up with exactly the keys of the notebook's default,
so that a misspelt or half-given setting fails here, before an hour of work, rather than deep inside a notebook.

Imports nothing of trsae.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

SHARED = "shared"


def notebook_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """The names assigned in a notebook's cell tagged ``parameters`` (what papermill can set), each with its
    default where that default is a Python literal (``None`` otherwise)."""
    nb = json.loads(Path(path).read_text())
    out: dict[str, Any] = {}
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            for node in ast.parse(src).body:
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                value = getattr(node, "value", None)
                try:
                    default = ast.literal_eval(value) if value is not None else None
                except ValueError:
                    default = None
                out |= {t.id: default for t in targets if isinstance(t, ast.Name)}
    return out


def notebook_parameters(path: str | os.PathLike) -> set[str]:
    """Names assigned in a notebook's cell tagged ``parameters``."""
    return set(notebook_defaults(path))


EXTENDS = "extends"
"""A parameter file's optional top-level key naming another parameter file (relative to it) that it changes:
its sections are merged into that file's as `notebook_view` merges a notebook's section into ``shared``."""


def load_params(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, dict[str, Any]]:
    """Read a sectioned parameter file: a mapping of ``shared`` and notebook names (file stems) to mappings, on top
    of the file it `EXTENDS`, if any."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"parameter file {p} not found: pass one of params/*.yaml")
    if p.resolve() in _seen:
        raise ValueError(f"{p}: {EXTENDS!r} loops back to itself ({' -> '.join(map(str, _seen))})")
    try:
        params = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({' '.join(str(e).split())}); fix the file") from None
    base = params.pop(EXTENDS, None) if isinstance(params, dict) else None
    bad = [k for k, v in params.items() if not isinstance(v, dict)] if isinstance(params, dict) else None
    if bad is None or bad:
        raise ValueError(f"{p}: expected sections ({SHARED!r} and notebook names such as '02_temporal') that each "
                         f"map parameter names to values; not a section: {bad}")
    if base is None:
        return params
    if not isinstance(base, str):
        raise ValueError(f"{p}: {EXTENDS!r} must name one parameter file, got {base!r}")
    merged = load_params(p.parent / base, (*_seen, p.resolve()))
    for section, values in params.items():
        own = merged.setdefault(section, {})
        for key, value in values.items():
            own[key] = {**own[key], **value} if isinstance(value, dict) and isinstance(own.get(key), dict) else value
    return merged


OPTIONAL_KEYS = {"harvest": {"device", "model_dtype"}, "train": {"device", "amp"}}
"""Keys a profile may add to a notebook's mapping parameter beyond the notebook default's: where the model and the
SAEs run (`trsae.config.HarvestConfig.device`, `TrainConfig.device`, ...), which the cpu defaults leave out."""


def notebook_view(params: dict[str, dict[str, Any]], notebook: str | os.PathLike,
                  source: str = "parameter file") -> dict[str, Any]:
    """The flat parameters papermill gives `notebook`: the shared keys it declares, then its own section, with
    mapping values merged key by key. Raises ``ValueError`` on a key the notebook does not declare or a mapping
    whose keys differ from the notebook default's (beyond `OPTIONAL_KEYS`)."""
    nb = Path(notebook)
    defaults = notebook_defaults(nb)
    own = params.get(nb.stem, {})
    unknown = sorted(set(own) - set(defaults))
    if unknown:
        raise ValueError(f"{source}: section {nb.stem!r} sets {unknown}, which {nb.name} does not declare; "
                         f"it declares {sorted(defaults)}")
    view: dict[str, Any] = {}
    for layer in ({k: v for k, v in params.get(SHARED, {}).items() if k in defaults}, own):
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(view.get(key), dict):
                value = {**view[key], **value}
            view[key] = value
    for key, value in view.items():
        default = defaults[key]
        extra = OPTIONAL_KEYS.get(key, set())
        if isinstance(default, dict) and (not isinstance(value, dict) or not
                                          set(default) <= set(value) <= set(default) | extra):
            got = sorted(value) if isinstance(value, dict) else repr(value)
            also = f", and optionally {sorted(extra)}" if extra else ""
            raise ValueError(f"{source}: {key!r} for {nb.name} must be a mapping with the keys {sorted(default)}"
                             f"{also} (the shared section and the notebook's own merge); got {got}")
    return view


def check_params_file(path: str | os.PathLike, notebooks: list[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """Load a parameter file and check it against the notebooks: every section names a notebook, every shared key
    is declared by some notebook, and each notebook's view is valid (see ``notebook_view``)."""
    params = load_params(path)
    stems = {Path(nb).stem: nb for nb in notebooks}
    stray = sorted(set(params) - set(stems) - {SHARED})
    if stray:
        raise ValueError(f"{path}: section(s) {stray} name no notebook; sections: {SHARED!r} or one of "
                         f"{sorted(stems)}")
    declared = set().union(*(notebook_parameters(nb) for nb in notebooks)) if notebooks else set()
    unknown = sorted(set(params.get(SHARED, {})) - declared)
    if unknown:
        raise ValueError(f"{path}: shared parameter(s) {unknown} are declared by no notebook")
    for nb in notebooks:
        notebook_view(params, nb, str(path))
    return params
