"""Syntax preservation: BLiMP and Linzen agreement, for the clean model or with a reconstruction spliced in at a
layer, and the scoring core they share with SyntaxGym (`trsae.evals.syntaxgym`).

Every text is scored as ``[BOS] + tokens(text)`` (no other special tokens), and a token's log-probability is
``log p(token_t | BOS, tokens_<t)`` from the model's logits. Sequences are batched by length and right-padded;
with a causal model the real tokens never attend to the padding and keep their positions, so a batched score
equals the unbatched one (tested).

An intervention is a *replace factory* ``(ids_BT, mask_BT) -> (h_BTD -> h_BTD)``: given a batch it returns the
function that replaces the layer output (``mask_BT`` is False on special tokens and padding). `sae_splice`
builds the factory that splices an SAE's reconstruction at ordinary tokens only (BOS keeps its clean
activation) with `trsae.lm.splice`, as `trsae.evaluate` does. Each scorer takes ``layer`` and either ``sae``
or ``replace``.

- **BLiMP**: a pair is correct when ``sum log p(sentence_good) > sum log p(sentence_bad)``; accuracy per
  paradigm, per linguistics term and overall (mean over pairs; ``macro`` = mean over paradigms).
- **Linzen agreement** (``subj_agr_filtered``: target word index, correct form, wrong form, attractors; or the
  Gulordava et al. ``generated`` set): correct when ``log p(" correct" | BOS, prefix) > log p(" wrong" | …)``,
  summed over the verb's tokens; accuracy overall and by number of attractors.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable

import numpy as np
import torch

from trsae.evals import eval_data_dir
from trsae.evals.text import batch_by_length, encode_with_offsets, pad_id_of, pad_right
from trsae.lm import logits_with_replacement, splice
from trsae.metrics.common import wide

ReplaceFactory = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
"""``(ids_BT, mask_BT) -> replace(h_BTD) -> h_BTD``."""

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------- scoring core


def sae_splice(sae) -> ReplaceFactory:
    """Replace factory that splices ``sae.reconstruct`` (raw activations in, raw out) at ordinary tokens, with
    positions ``0 … T-1`` (BOS = 0) and the batch mask passed to the SAE (`trsae.lm.splice`)."""
    return lambda ids_BT, mask_BT: splice(sae, mask_BT)


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
        logits_BKV = wide(logits_with_replacement(model, layer, ids_BT, fn, keep=T - s0))  # positions s0 … T-1
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
