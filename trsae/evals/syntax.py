"""Syntax preservation: BLiMP, SyntaxGym and Linzen agreement, for the clean model or with a reconstruction
spliced in at a layer.

Every text is scored as ``[BOS] + tokens(text)`` (no other special tokens), and a token's log-probability is
``log p(token_t | BOS, tokens_<t)`` from the model's logits. Sequences are batched by length and right-padded;
with a causal model the real tokens never attend to the padding and keep their positions, so a batched score
equals the unbatched one (tested).

An intervention is a *replace factory* ``(ids_BT, mask_BT) -> (h_BTD -> h_BTD)``: given a batch it returns the
function that replaces the layer output (``mask_BT`` is False on special tokens and padding). `sae_splice`
builds the factory that splices an SAE's reconstruction at ordinary tokens only (BOS keeps its clean
activation), as `trsae.evaluate` does. Each scorer takes ``layer`` and either ``sae`` or ``replace``.

- **BLiMP**: a pair is correct when ``sum log p(sentence_good) > sum log p(sentence_bad)``; accuracy per
  paradigm, per linguistics term and overall (mean over pairs; ``macro`` = mean over paradigms).
- **SyntaxGym**: each condition's text is its non-empty regions (stripped) joined by single spaces (no space
  before a region that starts with punctuation, e.g. the comma of the NP/Z suites); a token
  belongs to the region holding its first non-space character (a whitespace-only token to the next region);
  a region's surprisal is ``-sum log2 p`` over its tokens (bits, as SyntaxGym). Prediction formulas
  (``[(6;%match%) < (6;%mismatch%)] & …``) are parsed by a small recursive-descent parser with SyntaxGym's
  precedence (``+ -`` bind tighter than ``< > =``, which bind tighter than ``& |``; ``[ ]`` and ``( )`` group;
  ``=`` is ``isclose(rtol=1e-5, atol=1e-3)``; ``(*;%c%)`` sums all regions of condition c). An item passes
  when every prediction of its suite holds; suite accuracy = share of items that pass (per-prediction
  accuracies are reported too).
- **Linzen agreement** (``subj_agr_filtered``: target word index, correct form, wrong form, attractors; or the
  Gulordava et al. ``generated`` set): correct when ``log p(" correct" | BOS, prefix) > log p(" wrong" | …)``,
  summed over the verb's tokens; accuracy overall and by number of attractors.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Iterable

import numpy as np
import torch

from trsae.evals import eval_data_dir
from trsae.evals.ud import batch_by_length, encode_with_offsets, pad_id_of, pad_right
from trsae.lm import logits_with_replacement

ReplaceFactory = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
"""``(ids_BT, mask_BT) -> replace(h_BTD) -> h_BTD``."""

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------- scoring core


def sae_splice(sae) -> ReplaceFactory:
    """Replace factory that splices ``sae.reconstruct`` (raw activations in, raw out) at ordinary tokens, with
    positions ``0 … T-1`` (BOS = 0) and the batch mask passed to the SAE."""

    def factory(ids_BT: torch.Tensor, mask_BT: torch.Tensor):
        pos_BT = torch.arange(ids_BT.shape[1]).expand_as(ids_BT)

        def replace(h_BTD: torch.Tensor) -> torch.Tensor:
            x_hat_BTD = sae.reconstruct(h_BTD, pos_BT=pos_BT, mask_BT=mask_BT)
            return torch.where(mask_BT[..., None], x_hat_BTD.to(h_BTD.dtype), h_BTD)

        return replace

    return factory


def _resolve(layer: int | None, sae, replace: ReplaceFactory | None) -> tuple[int, ReplaceFactory | None]:
    if sae is not None and replace is not None:
        raise ValueError("pass either sae or replace, not both")
    if sae is not None:
        replace = sae_splice(sae)
    if replace is not None and layer is None:
        raise ValueError("an intervention (sae or replace) needs the layer it replaces")
    return (0 if layer is None else layer), replace


@torch.no_grad()
def token_logprobs(model, ids: list[list[int]], layer: int | None = None, sae=None,
                   replace: ReplaceFactory | None = None, batch_size: int = 16,
                   first: list[int] | None = None) -> list[np.ndarray]:
    """``lp[i][t] = log p(ids[i][t] | ids[i][:t])`` (natural log) for ``t >= first[i]`` (default 1), NaN before
    (BOS is never predicted). ``[len(ids[i])]`` float64 each. Only the positions needed by the batch are
    unembedded."""
    layer, replace = _resolve(layer, sae, replace)
    first = [1] * len(ids) if first is None else [max(1, int(f)) for f in first]
    pad = pad_id_of(model)
    out: list[np.ndarray | None] = [None] * len(ids)
    for batch in batch_by_length([len(x) for x in ids], batch_size):
        ids_BT, valid_BT = pad_right([ids[i] for i in batch], pad)
        T = ids_BT.shape[1]
        fn = None if replace is None else replace(ids_BT, model.special_mask(ids_BT) & valid_BT)
        s0 = min(first[i] for i in batch) - 1  # first position whose logits predict a needed token
        logits_BKV = logits_with_replacement(model, layer, ids_BT, fn, keep=T - s0).float()  # positions s0 … T-1
        lse_BK = torch.logsumexp(logits_BKV[:, :-1], dim=-1)
        tgt_BK = logits_BKV[:, :-1].gather(-1, ids_BT[:, s0 + 1:, None]).squeeze(-1)
        lp_BK = (tgt_BK - lse_BK).double().numpy()  # lp_BK[:, j] is the log-prob of token s0 + 1 + j
        del logits_BKV
        for b, i in enumerate(batch):
            n = len(ids[i])
            lp = np.full(n, np.nan)
            lp[s0 + 1:] = lp_BK[b, :n - s0 - 1]
            lp[:first[i]] = np.nan
            out[i] = lp
    return out  # type: ignore[return-value]


def text_ids(model, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``[BOS] + tokens(text)`` and the tokens' character offsets in ``text`` (BOS gets ``(0, 0)``)."""
    tok_ids, offsets = encode_with_offsets(model.tokenizer, text)
    return [model.bos_id] + tok_ids, [(0, 0)] + offsets


def token_anchor(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """Character that decides which region each token belongs to: its first non-space character, or, for a
    whitespace-only token, the next non-space character of the text (``len(text)`` if none)."""
    out = []
    for a, b in offsets:
        j = a
        while j < len(text) and (j < b or a == b) and text[j].isspace():
            j += 1
        if j >= b and b > a:  # whitespace-only token: the next non-space character
            j = b
            while j < len(text) and text[j].isspace():
                j += 1
        out.append(j)
    return out


# --------------------------------------------------------------------------------------------- BLiMP


def blimp_paradigms(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Names (UIDs) of the BLiMP paradigms in the mirror, sorted."""
    return sorted(p.stem for p in eval_data_dir("blimp", data_dir).glob("*.jsonl"))


def load_blimp(paradigms: Iterable[str] | None = None, max_items: int | None = None,
               data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The first ``max_items`` pairs (file order) of each paradigm (all when None), as the jsonl rows."""
    folder = eval_data_dir("blimp", data_dir)
    names = blimp_paradigms(data_dir) if paradigms is None else list(paradigms)
    rows = []
    for name in names:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            from trsae.data import DataError

            raise DataError(f"BLiMP paradigm {name!r} not found at {path}; "
                            f"known: {', '.join(blimp_paradigms(data_dir))}")
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if max_items is not None and i >= max_items:
                    break
                if line.strip():
                    rows.append(json.loads(line))
    return rows


def score_pairs(model, good: list[str], bad: list[str], layer: int | None = None, sae=None,
                replace: ReplaceFactory | None = None, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probabilities ``[N]`` of each good and bad sentence, given BOS."""
    ids = [text_ids(model, s)[0] for s in list(good) + list(bad)]
    lps = token_logprobs(model, ids, layer=layer, sae=sae, replace=replace, batch_size=batch_size)
    tot = np.array([lp[1:].sum() for lp in lps])
    return tot[:len(good)], tot[len(good):]


def score_blimp(model, paradigms: Iterable[str] | None = None, max_items: int | None = 100,
                layer: int | None = None, sae=None, replace: ReplaceFactory | None = None, batch_size: int = 16,
                data_dir: str | os.PathLike | None = None) -> dict:
    """BLiMP accuracy: ``{"overall", "macro", "n", "per_paradigm": {uid: acc}, "per_term": {term: acc},
    "correct": [N] bool, "uid": [N], "margin": [N] (log p good - log p bad)}``."""
    rows = load_blimp(paradigms, max_items, data_dir)
    lp_good, lp_bad = score_pairs(model, [r["sentence_good"] for r in rows], [r["sentence_bad"] for r in rows],
                                  layer=layer, sae=sae, replace=replace, batch_size=batch_size)
    correct = lp_good > lp_bad
    uid = np.array([r["UID"] for r in rows])
    term = np.array([r.get("linguistics_term", "") for r in rows])
    per_paradigm = {u: float(correct[uid == u].mean()) for u in dict.fromkeys(uid.tolist())}
    return {"overall": float(correct.mean()) if len(rows) else float("nan"),
            "macro": float(np.mean(list(per_paradigm.values()))) if per_paradigm else float("nan"),
            "n": int(len(rows)), "per_paradigm": per_paradigm,
            "per_term": {t: float(correct[term == t].mean()) for t in dict.fromkeys(term.tolist())},
            "correct": correct, "uid": uid, "margin": lp_good - lp_bad}


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


# --------------------------------------------------------------------------------------------- Linzen agreement


def linzen_items(which: str = "linzen", max_items: int | None = None,
                 data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Agreement items ``{"prefix", "correct", "wrong", "n_attractors"}``.

    ``which="linzen"``: ``subj_agr_filtered.text/.gold`` (the prefix is the words before the 0-based target
    index; the trailing ``<eos>`` is dropped; items whose target word is not the correct form are skipped).
    ``which="gulordava"``: ``generated.tab`` (pairs of correct/wrong rows sharing pattern, construction and
    sentence id). ``max_items`` caps the items **per number of attractors** (the first in file order).
    """
    folder = eval_data_dir("linzen", data_dir)
    items = []
    if which == "linzen":
        texts = (folder / "subj_agr_filtered.text").read_text(encoding="utf-8").splitlines()
        golds = (folder / "subj_agr_filtered.gold").read_text(encoding="utf-8").splitlines()
        if len(texts) != len(golds):
            from trsae.data import DataError

            raise DataError(f"{folder}: subj_agr_filtered.text and .gold differ in length")
        for text, gold in zip(texts, golds):
            idx, correct, wrong, n_attr = gold.split("\t")[:4]
            words = text.split()
            if words and words[-1] == "<eos>":
                words = words[:-1]
            i = int(idx)
            if i >= len(words) or words[i] != correct:
                continue
            items.append({"prefix": " ".join(words[:i]), "correct": correct, "wrong": wrong,
                          "n_attractors": int(n_attr)})
    elif which == "gulordava":
        import csv

        with open(folder / "generated.tab", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        pairs: dict[tuple, dict] = {}
        for r in rows:
            pairs.setdefault((r["pattern"], r["constr_id"], r["sent_id"], r["prefix"]), {})[r["class"]] = r
        for pair in pairs.values():
            if {"correct", "wrong"} <= set(pair):
                c, w = pair["correct"], pair["wrong"]
                items.append({"prefix": c["prefix"], "correct": c["form"], "wrong": w["form"],
                              "n_attractors": int(c["n_attr"])})
    else:
        raise ValueError(f"unknown agreement set {which!r}: 'linzen' or 'gulordava'")
    if max_items is None:
        return items
    seen: dict[int, int] = {}
    out = []
    for it in items:
        n = seen.get(it["n_attractors"], 0)
        if n < max_items:
            out.append(it)
            seen[it["n_attractors"]] = n + 1
    return out


def continuation_logprobs(model, prefixes: list[str], continuations: list[str], layer: int | None = None,
                          sae=None, replace: ReplaceFactory | None = None, batch_size: int = 16) -> np.ndarray:
    """``[N]`` ``log p(continuation | BOS, prefix)`` summed over the continuation's tokens. The text is
    ``prefix + " " + continuation`` (just the continuation when the prefix is empty); a token belongs to the
    continuation when its first non-space character does (`token_anchor`)."""
    ids, starts, metas = [], [], []
    for p, c in zip(prefixes, continuations):
        text = f"{p} {c}" if p else c
        i, offs = text_ids(model, text)
        ids.append(i)
        metas.append((text, offs))
        starts.append(len(text) - len(c))
    sels = []
    for k, ((text, offs), s) in enumerate(zip(metas, starts)):
        anchors = token_anchor(text, offs[1:])
        sel = [t + 1 for t, a in enumerate(anchors) if a >= s]
        if not sel:
            raise ValueError(f"continuation {continuations[k]!r} has no tokens in {text!r}")
        sels.append(sel)
    lps = token_logprobs(model, ids, layer=layer, sae=sae, replace=replace, batch_size=batch_size,
                         first=[sel[0] for sel in sels])
    return np.array([lps[k][sel].sum() for k, sel in enumerate(sels)])


def score_linzen(model, which: str = "linzen", max_items: int | None = 200, layer: int | None = None, sae=None,
                 replace: ReplaceFactory | None = None, batch_size: int = 16,
                 data_dir: str | os.PathLike | None = None) -> dict:
    """Agreement accuracy: ``{"accuracy", "n", "by_attractors": {n_attr: {"accuracy", "n"}}, "correct": [N],
    "n_attractors": [N], "margin": [N]}`` (``max_items`` per number of attractors)."""
    items = linzen_items(which, max_items, data_dir)
    pre = [it["prefix"] for it in items]
    lp_c = continuation_logprobs(model, pre, [it["correct"] for it in items], layer, sae, replace, batch_size)
    lp_w = continuation_logprobs(model, pre, [it["wrong"] for it in items], layer, sae, replace, batch_size)
    correct = lp_c > lp_w
    n_attr = np.array([it["n_attractors"] for it in items])
    by = {int(a): {"accuracy": float(correct[n_attr == a].mean()), "n": int((n_attr == a).sum())}
          for a in sorted(set(n_attr.tolist()))}
    return {"accuracy": float(correct.mean()) if len(items) else float("nan"), "n": len(items),
            "by_attractors": by, "correct": correct, "n_attractors": n_attr, "margin": lp_c - lp_w}
