"""Offline feature dashboards: a static site (no server; opens from disk and works offline) per SAE on a store.

Per feature: top-activating contexts with each token's code (hover for the value), contexts sampled from
quantile bands of its activations, the activation histogram, activation against position, the top and bottom
logits of its decoder direction through the model's final norm and unembedding, its nearest decoder
neighbours, optional labels with F1; for a TRSAE the token / position / context terms of the pre-activation and
the context read's attention weight on each earlier token; with two SAEs each feature's best decoder-cosine
match in the other dictionary and a side-by-side page.

    collect   one pass of an SAE over a split: active pairs, TRSAE terms, attention features
    weights   unembedding logits, neighbours, matches, context / positional strengths
    data      per-feature records and index rows
    site      the files (Jinja2 templates in templates/, CSS / JS in static/)
    shots     screenshots of pages in headless Chromium (the paper's figure, notebook 04's pictures)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trsae.dashboard.collect import collect
from trsae.dashboard.data import Settings, Tokens, buckets, pair_up, summarise
from trsae.dashboard.shots import PAPER_MIN_FONT_PX, PAPER_PANELS, PAPER_WIDTH, screenshot
from trsae.dashboard.site import safe_name, write_common, write_sae
from trsae.saes import SAE, load_sae
from trsae.store import ActivationStore
from trsae.timing import timed

__all__ = ["PAPER_MIN_FONT_PX", "PAPER_PANELS", "PAPER_WIDTH", "Settings", "Site", "build", "load_labels", "open_sae", "screenshot", "showcase"]


@dataclass
class Site:
    """What `build` wrote."""

    out: Path
    """The site's folder; open ``out / "index.html"``."""
    names: list[str]
    """One folder per SAE, in order."""
    bytes: dict[str, int]
    """Size of each SAE's folder."""
    seconds: float
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per SAE: ``density`` of every feature on the shown tokens and, for a TRSAE, its ``context`` and
    ``positional`` strengths relative to the token term (None for a per-token SAE)."""

    def page(self, name: str | None = None, feature: int | None = None) -> Path:
        """The index of SAE `name` (default the first), or its page of `feature` (open as ``<path>#<feature>``)."""
        folder = self.out / (name or self.names[0])
        return folder / ("index.html" if feature is None else "feature.html")


def open_sae(path: str | os.PathLike) -> SAE:
    """An SAE from a run folder (its ``sae/``) or from an SAE folder."""
    path = Path(path)
    return load_sae(path / "sae" if (path / "sae").is_dir() else path)


def load_labels(path: str | os.PathLike) -> dict:
    """A labels file: JSON ``{feature: [label, f1]}`` (or a list of such pairs per feature)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"labels file {path} is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"labels file {path} must hold an object {{feature: [label, f1]}}")
    return raw


@timed("dashboards")
def build(store: ActivationStore | str | os.PathLike, saes: SAE | str | os.PathLike | Sequence,
          out_dir: str | os.PathLike, model: Any = None, labels: dict | Sequence[dict | None] | None = None,
          names: Sequence[str] | None = None, split: str = "test", max_tokens: int = 1 << 16,
          settings: Settings | None = None, logits: bool = True, progress: bool = False) -> Site:
    """Build the dashboard of one or more SAEs (each an `SAE`, a run folder or an SAE folder) on a store.

    `model`: a `trsae.lm.LoadedModel` for the tokenizer and the unembedding (None: load the store's model; with
    ``logits=False`` and no model, tokens are shown as ids). `labels`: per SAE (or one dict for the first)
    ``{feature: [label, f1]}``. `names`: folder names (default the SAE's label, made unique). Codes come from
    up to `max_tokens` tokens of whole sequences of `split`.
    """
    t0 = time.perf_counter()
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    saes = list(saes) if isinstance(saes, (list, tuple)) else [saes]
    saes = [s if isinstance(s, SAE) else open_sae(s) for s in saes]
    if not saes:
        raise ValueError("build needs at least one SAE")
    if labels is None or isinstance(labels, dict):
        labels = [labels] + [None] * (len(saes) - 1)
    if len(labels) != len(saes):
        raise ValueError(f"{len(labels)} label sets for {len(saes)} SAEs")
    names = list(names) if names else _default_names(saes)
    if len(set(names)) != len(names) or len(names) != len(saes):
        raise ValueError(f"names {names} must be unique, one per SAE")
    names = [safe_name(n) for n in names]
    for s in saes:
        if s.cfg.d_in != store.d_model:
            raise ValueError(f"an SAE of d_in={s.cfg.d_in} does not fit the store's d_model={store.d_model}")
    if model is None and logits:
        from trsae.lm import load_model

        model = load_model(store.manifest["model"], dtype=store.dtype)
    tokens = Tokens(getattr(model, "tokenizer", None))
    hf = getattr(model, "hf", None) if logits else None
    s = settings or Settings()
    datas = []
    for name, sae, lab in zip(names, saes, labels):
        _say(progress, f"{name}: encoding the {split} split")
        datas.append(summarise(name, sae, collect(sae, store, split, max_tokens), s, hf, lab))
    if len(datas) == 2:
        pair_up(*datas)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes, metas, feats = {}, [], {}
    for d in datas:
        _say(progress, f"{d.name}: writing {d.p.width} feature pages")
        meta = {"name": d.name, "width": d.p.width, "d_in": d.sae.cfg.d_in, "label": d.sae.cfg.label,
                "encoder": d.sae.cfg.encoder.to_dict(), "sparsity": d.sae.cfg.sparsity.to_dict(),
                "store": str(store.path), "model": store.manifest["model"], "layer": store.layer,
                "site": store.site,
                "split": split, "tokens": int(d.p.mask_N.sum()), "temporal": d.strength is not None,
                "has_labels": bool(d.labels), "has_logits": d.logits is not None, "other": d.other,
                "buckets": buckets(d.sae)}
        sizes[d.name] = write_sae(out, d, s, tokens, meta)
        metas.append(meta)
        ctx, pos = d.strength if d.strength is not None else (None, None)
        feats[d.name] = {"density": d.density_F, "context": ctx, "positional": pos}
    write_common(out, metas)
    return Site(out=out, names=names, bytes=sizes, seconds=time.perf_counter() - t0, features=feats)


def showcase(site: Site, name: str, min_density: float = 1e-3) -> dict[str, int]:
    """Two features of the temporal SAE `name` worth a look: the most context-driven and the most positional (by
    strength relative to the token term), among features firing on at least `min_density` of the shown tokens:
    ``{"context": f, "positional": g}`` (g differs from f)."""
    import numpy as np

    fs = site.features[name]
    if fs["context"] is None:
        raise ValueError(f"{name} is not a temporal SAE: it has no context or positional strengths")
    alive = fs["density"] >= min_density
    if alive.sum() < 2:
        raise ValueError(f"fewer than two features of {name} fire on {min_density:.0e} of the shown tokens")
    ctx = int(np.argmax(np.where(alive, fs["context"], -np.inf)))
    pos = np.where(alive, fs["positional"], -np.inf)
    pos[ctx] = -np.inf
    return {"context": ctx, "positional": int(np.argmax(pos))}


def _default_names(saes: list[SAE]) -> list[str]:
    names = [s.cfg.label for s in saes]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def _say(on: bool, msg: str) -> None:
    if on:
        print(msg, flush=True)
