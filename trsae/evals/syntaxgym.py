"""SyntaxGym: each suite's predictions over region surprisals, for the clean model or with a reconstruction
spliced in (the scoring core, batching and interventions are those of `trsae.evals.syntax`).

Each condition's text is its non-empty regions (stripped) joined by single spaces (no space before a region that
starts with punctuation, e.g. the comma of the NP/Z suites); a token belongs to the region holding its first
non-space character (a whitespace-only token to the next region); a region's surprisal is ``-sum log2 p`` over
its tokens (bits, as SyntaxGym). Prediction formulas (``[(6;%match%) < (6;%mismatch%)] & …``) are parsed by a
small recursive-descent parser with SyntaxGym's precedence (``+ -`` bind tighter than ``< > =``, which bind
tighter than ``& |``; ``[ ]`` and ``( )`` group; ``=`` is ``isclose(rtol=1e-5, atol=1e-3)``; ``(*;%c%)`` sums
all regions of condition c). An item passes when every prediction of its suite holds; suite accuracy = share of
items that pass (per-prediction accuracies are reported too).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import numpy as np

from trsae.evals import eval_data_dir
from trsae.evals.syntax import LN2, ReplaceFactory, text_ids, token_anchor, token_logprobs


# --------------------------------------------------------------------------------------------- SyntaxGym formulas

_TOKEN_RE = re.compile(r"\s*(?:(?P<region>\(\s*(?:\d+|\*)\s*;\s*%[^%]+%\s*\))|(?P<num>\d+\.?\d*|\.\d+)"
                       r"|(?P<op>[-+<>=&|\[\]()]))")
_REGION_RE = re.compile(r"\(\s*(\d+|\*)\s*;\s*%([^%]+)%\s*\)")
_CLOSE = {"[": "]", "(": ")"}


def _lex(formula: str) -> list[tuple[str, object]]:
    toks, i = [], 0
    while i < len(formula):
        if formula[i:].strip() == "":
            break
        m = _TOKEN_RE.match(formula, i)
        if m is None:
            raise ValueError(f"cannot parse formula {formula!r} at {formula[i:]!r}")
        if m.group("region"):
            r = _REGION_RE.match(m.group("region").strip())
            toks.append(("region", (r.group(2), r.group(1))))
        elif m.group("num"):
            toks.append(("num", float(m.group("num"))))
        else:
            toks.append(("op", m.group("op")))
        i = m.end()
    return toks


def parse_formula(formula: str):
    """Parse a SyntaxGym prediction formula into a tree of tuples: ``("region", condition, number | "*")``,
    ``("num", value)`` or ``(op, left, right)`` with op in ``+ - < > = & |``. Raises ValueError if malformed."""
    toks = _lex(formula)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else (None, None)

    def take(kind=None, values=None):
        nonlocal pos
        k, v = peek()
        if k is None or (kind and k != kind) or (values and v not in values):
            raise ValueError(f"formula {formula!r}: unexpected {v!r} at token {pos}")
        pos += 1
        return v

    def chain(sub, ops):
        node = sub()
        while peek()[0] == "op" and peek()[1] in ops:
            op = take()
            node = (op, node, sub())
        return node

    def atom():
        k, v = peek()
        if k == "region":
            take()
            return ("region", v[0], v[1])
        if k == "num":
            take()
            return ("num", v)
        if k == "op" and v in _CLOSE:
            take()
            node = boolean()
            take("op", {_CLOSE[v]})
            return node
        raise ValueError(f"formula {formula!r}: unexpected {v!r} at token {pos}")

    def arith():
        return chain(atom, {"+", "-"})

    def compare():
        return chain(arith, {"<", ">", "="})

    def boolean():
        return chain(compare, {"&", "|"})

    tree = boolean()
    if pos != len(toks):
        raise ValueError(f"formula {formula!r}: trailing {toks[pos][1]!r}")
    return tree


def evaluate_formula(tree, surprisal: dict[tuple[str, int], float]):
    """Value of a parsed formula given ``surprisal[(condition, region_number)]`` (a bool for a comparison)."""
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "region":
        cond, num = tree[1], tree[2]
        if num == "*":
            return sum(v for (c, _), v in surprisal.items() if c == cond)
        key = (cond, int(num))
        if key not in surprisal:
            raise KeyError(f"no surprisal for condition {cond!r} region {num}")
        return surprisal[key]
    a, b = evaluate_formula(tree[1], surprisal), evaluate_formula(tree[2], surprisal)
    ops = {"+": lambda: a + b, "-": lambda: a - b, "<": lambda: a < b, ">": lambda: a > b,
           "=": lambda: bool(np.isclose(a, b, rtol=1e-5, atol=1e-3)), "&": lambda: bool(a and b),
           "|": lambda: bool(a or b)}
    return ops[kind]()


# --------------------------------------------------------------------------------------------- SyntaxGym suites


def syntaxgym_suites(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the SyntaxGym suites in the mirror, sorted."""
    return sorted(p.stem for p in eval_data_dir("syntaxgym", data_dir).glob("*.json"))


def load_suite(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """A suite's JSON (``meta``, ``region_meta``, ``predictions``, ``items``) by name or path."""
    from pathlib import Path

    path = Path(name) if name.endswith(".json") else eval_data_dir("syntaxgym", data_dir) / f"{name}.json"
    if not path.is_file():
        from trsae.data import DataError

        raise DataError(f"SyntaxGym suite {name!r} not found at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


_NO_SPACE_BEFORE = frozenset(",.;:!?")


def condition_text(regions: list[dict]) -> tuple[str, dict[int, tuple[int, int]]]:
    """A condition's text (non-empty regions, stripped, joined by spaces, except that a region starting with
    ``, . ; : ! ?`` attaches to the previous one, as in ordinary text) and each region's ``[s, e)`` character
    span (an empty region gets an empty span and surprisal 0)."""
    text, spans = "", {}
    for r in regions:
        content = str(r.get("content", "")).strip()
        if content:
            if text and content[0] not in _NO_SPACE_BEFORE:
                text += " "
            spans[int(r["region_number"])] = (len(text), len(text) + len(content))
            text += content
        else:
            spans[int(r["region_number"])] = (len(text), len(text))
    return text, spans


def region_surprisals(model, items: list[dict], layer: int | None = None, sae=None,
                      replace: ReplaceFactory | None = None, batch_size: int = 16,
                      metric: str = "sum") -> list[dict[tuple[str, int], float]]:
    """Per item, ``{(condition, region_number): surprisal in bits}`` (``metric`` sum or mean over tokens)."""
    texts, meta = [], []
    for it in items:
        for c in it["conditions"]:
            text, spans = condition_text(c["regions"])
            ids, offs = text_ids(model, text)
            texts.append(ids)
            meta.append((text, spans, offs, c["condition_name"]))
    lps = token_logprobs(model, texts, layer=layer, sae=sae, replace=replace, batch_size=batch_size)
    out: list[dict] = []
    k = 0
    for it in items:
        d: dict[tuple[str, int], float] = {}
        for _ in it["conditions"]:
            text, spans, offs, cond = meta[k]
            anchors = token_anchor(text, offs[1:])
            for rnum, (s, e) in spans.items():
                vals = [-lps[k][t + 1] / LN2 for t, a in enumerate(anchors) if s <= a < e]
                d[(cond, rnum)] = float(np.mean(vals)) if (metric == "mean" and vals) else float(sum(vals))
            k += 1
        out.append(d)
    return out


def evaluate_suite(suite: dict, surprisals: list[dict[tuple[str, int], float]]) -> dict:
    """Apply a suite's predictions to per-item surprisals: ``{"accuracy" (items passing every prediction),
    "prediction_accuracy": [per prediction], "n_items", "passed": [N] bool}``."""
    trees = [parse_formula(p["formula"]) for p in suite["predictions"] if p.get("type", "formula") == "formula"]
    res = np.array([[bool(evaluate_formula(t, s)) for t in trees] for s in surprisals], dtype=bool)
    res = res.reshape(len(surprisals), len(trees))
    passed = res.all(axis=1)
    return {"accuracy": float(passed.mean()) if len(passed) else float("nan"),
            "prediction_accuracy": res.mean(axis=0).tolist() if len(passed) else [],
            "n_items": int(len(passed)), "passed": passed}


def score_syntaxgym(model, suites: Iterable[str] | None = None, max_items: int | None = None,
                    layer: int | None = None, sae=None, replace: ReplaceFactory | None = None, batch_size: int = 16,
                    data_dir: str | os.PathLike | None = None) -> dict:
    """``{"per_suite": {name: evaluate_suite result}, "overall": mean suite accuracy}`` over the first
    ``max_items`` items of each suite."""
    names = syntaxgym_suites(data_dir) if suites is None else list(suites)
    per = {}
    for name in names:
        suite = load_suite(name, data_dir)
        items = suite["items"][:max_items] if max_items is not None else suite["items"]
        metric = suite.get("meta", {}).get("metric", "sum")
        if metric not in ("sum", "mean"):
            raise ValueError(f"suite {name}: unsupported metric {metric!r} (sum or mean)")
        surps = region_surprisals(model, items, layer=layer, sae=sae, replace=replace, batch_size=batch_size,
                                  metric=metric)
        per[name] = evaluate_suite(suite, surps)
    accs = [r["accuracy"] for r in per.values()]
    return {"per_suite": per, "overall": float(np.mean(accs)) if accs else float("nan")}
