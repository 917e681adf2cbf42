"""Write the static site: HTML shells from Jinja2 templates, the shared CSS / JS, and the data as small JS files
that call ``TRSAE.index(...)`` / ``TRSAE.feature(...)`` (a page opened from disk, ``file://``, may load scripts
but not fetch JSON).

Layout of ``out/``::

    index.html                 the SAEs, with links
    compare.html               two SAEs' features side by side (#a=<id>&b=<id>), with two SAEs only
    static/                    dashboard.css, common.js, index.js, feature.js
    <name>/index.html          the feature table (sort, filter, search, pages of 100 rows)
    <name>/feature.html        one feature (#<id>), loads <name>/data/f/<id>.js
    <name>/data/index.js       one row per feature
    <name>/data/f/<id>.js      one feature's record
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from jinja2 import Environment, FileSystemLoader, select_autoescape

from trsae.dashboard.data import INDEX_COLUMNS, SAEData, Settings, Tokens, index_rows, records

HERE = Path(__file__).resolve().parent
STATIC = ("dashboard.css", "common.js", "index.js", "feature.js")


def env() -> Environment:
    return Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(["j2"]),
                       trim_blocks=True, lstrip_blocks=True)


def safe_name(name: str) -> str:
    """A folder name made of letters, digits, ``-``, ``_`` and ``.``."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    if not out:
        raise ValueError(f"SAE name {name!r} has no usable characters for a folder name")
    return out


def js_call(fn: str, obj: Any) -> str:
    """``TRSAE.fn(<json>);`` with ``</`` escaped, so the data can never close a script element."""
    return f"TRSAE.{fn}(" + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/") + ");\n"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_sae(out: Path, d: SAEData, s: Settings, tokens: Tokens, meta: dict[str, Any]) -> int:
    """Write one SAE's pages and data under ``out/<d.name>``; returns its size in bytes."""
    root = out / d.name
    fdir = root / "data" / "f"
    fdir.mkdir(parents=True, exist_ok=True)
    for rec in records(d, s, tokens):
        (fdir / f"{rec['f']}.js").write_text(js_call("feature", rec), encoding="utf-8")
    index = {"sae": d.name, "other": d.other, "columns": list(INDEX_COLUMNS), "rows": index_rows(d, tokens),
             "meta": meta}
    (root / "data" / "index.js").write_text(js_call("index", index), encoding="utf-8")
    e = env()
    ctx = {"name": d.name, "meta": meta, "static": "../static", "other": d.other}
    (root / "index.html").write_text(e.get_template("index.html.j2").render(**ctx), encoding="utf-8")
    (root / "feature.html").write_text(e.get_template("feature.html.j2").render(**ctx), encoding="utf-8")
    return folder_bytes(root)


def write_common(out: Path, saes: Iterable[dict[str, Any]]) -> None:
    """The static assets, the home page and (with two SAEs) the side-by-side page."""
    saes = list(saes)
    (out / "static").mkdir(parents=True, exist_ok=True)
    for name in STATIC:
        shutil.copyfile(HERE / "static" / name, out / "static" / name)
    e = env()
    ctx = {"saes": saes, "static": "static", "buckets": {s["name"]: s["buckets"] for s in saes}}
    (out / "index.html").write_text(e.get_template("home.html.j2").render(**ctx), encoding="utf-8")
    if len(saes) == 2:
        (out / "compare.html").write_text(e.get_template("compare.html.j2").render(**ctx), encoding="utf-8")
