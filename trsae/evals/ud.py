"""UD English EWT for probing: CoNLL-U parsing, word -> model-token alignment, token-level labels, and the
features (raw residual or SAE codes, `trsae.evals.text.encode_contexts`) of a model layer at every ordinary token.

**Parsing.** Multiword-token ranges (``29-30 didn't``) and empty nodes (``8.1``) are skipped: a sentence is its
syntactic words with UPOS, XPOS, head (1-based, 0 = root) and relation. Each word gets a character span in the
sentence's ``# text``: the surface tokens (the range form for a multiword token) are found left to right in
the text; the words of a multiword token split its span when their forms concatenate to it (``did`` +
``n't`` = ``didn't``), else they all share it. A sentence whose surface tokens cannot be found in its text
(or that has no ``# text``) is rebuilt from the forms and ``SpaceAfter=No``.

**Alignment rule.** A context is ``[BOS] + tokens(text)`` with the original spacing (one sentence per context,
or consecutive sentences of one document joined by a space when ``pack_tokens`` is set), tokenised with the
fast tokenizer's ``return_offsets_mapping``. A UD word is represented by its **last sub-token**: the token
whose character span contains the word's last character. Indices count BOS, so the first text token is 1.
Example with the GPT-2 tokenizer: ``I don't know.`` -> ``[BOS] I | Ġdon | 't | Ġknow | .``; the words
``I do n't know .`` map to tokens 1, 2, 3, 4, 5 (``do`` ends inside ``Ġdon``).

**Labels** (one string per word, `LABELS`):

- ``upos``, ``xpos``: gold tags; ``deprel``: the relation before ``:`` (``acl:relcl`` -> ``acl``).
- ``head_dir``: ``left`` (the head precedes the word), ``right`` (it follows) or ``root``;
  ``head_dist``: ``root`` or a log2 bucket of ``|head - word|`` in words (``1``, ``2-3``, ``4-7``, ``8+``).
- ``abs_pos``: log2 bucket of the aligned token's index in its context (BOS = 0, so ``1``, ``2-3``, …, ``64+``);
  ``word_pos``: log2 bucket of the 1-based word index in its sentence (``1``, ``2-3``, …, ``32+``).
- discourse: ``connective`` = ``1`` when the relation is ``cc`` or ``mark``, else ``0``;
  ``clause_start`` = ``1`` on the first word of the sentence and on the first (leftmost) word of the subtree of
  every word whose relation is ``advcl``, ``ccomp`` or ``acl`` (incl. subtypes such as ``acl:relcl``), else ``0``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trsae.evals.text import TokenFeatures, encode_contexts, encode_with_offsets, last_token_indices

UD_SPLITS = ("train", "dev", "test")
LABELS = ("upos", "xpos", "deprel", "head_dir", "head_dist", "abs_pos", "word_pos", "connective", "clause_start")
CONNECTIVE_RELS = frozenset({"cc", "mark"})
CLAUSE_RELS = frozenset({"advcl", "ccomp", "acl"})


@dataclass
class Sentence:
    """One UD sentence: its syntactic words (multiword ranges and empty nodes removed)."""

    sent_id: str
    doc_id: str
    text: str
    words: list[str]
    upos: list[str]
    xpos: list[str]
    head: list[int]
    """1-based index of each word's head; 0 for the root."""
    deprel: list[str]
    """Full relation, subtype included (``acl:relcl``)."""
    spans: list[tuple[int, int]] = field(default_factory=list)
    """``[start, end)`` character span of each word in `text`."""


# --------------------------------------------------------------------------------------------- parsing


def parse_conllu(lines: str | Iterable[str], max_sentences: int | None = None) -> list[Sentence]:
    """Sentences of a CoNLL-U document (a string, or an iterable of lines), at most ``max_sentences``."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    return list(_iter_sentences(lines, max_sentences))


def _iter_sentences(lines: Iterable[str], max_sentences: int | None) -> Iterator[Sentence]:
    n, doc_id, meta, rows = 0, "", {}, []
    for raw in _with_end(iter(lines)):
        line = raw.rstrip("\n").rstrip("\r")
        if not line.strip():
            if rows:
                yield _build(meta, rows, doc_id)
                n += 1
                if max_sentences is not None and n >= max_sentences:
                    return
            meta, rows = {}, []
        elif line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key = key.strip()
            if key == "newdoc id":
                doc_id = value.strip()
            elif key in ("sent_id", "text"):
                meta[key] = value.strip() if key == "sent_id" else value.lstrip(" ")
        else:
            cols = line.split("\t")
            if len(cols) != 10:
                raise ValueError(f"malformed CoNLL-U line (expected 10 tab-separated columns): {line!r}")
            rows.append(cols)


def _with_end(it: Iterator[str]) -> Iterator[str]:
    yield from it
    yield ""


def _build(meta: dict, rows: list[list[str]], doc_id: str) -> Sentence:
    words, upos, xpos, head, deprel = [], [], [], [], []
    surface: list[tuple[str, list[int], bool]] = []  # (form, word indices, space after)
    mwt_end, mwt = 0, None
    for cols in rows:
        wid, form, misc = cols[0], cols[1], cols[9]
        space = "SpaceAfter=No" not in misc.split("|")
        if "-" in wid:  # multiword range: its words follow
            a, b = (int(x) for x in wid.split("-"))
            mwt_end, mwt = b, (form, [], space)
            surface.append(mwt)
            continue
        if "." in wid:  # empty node
            continue
        i = len(words)
        words.append(form)
        upos.append(cols[3])
        xpos.append(cols[4])
        head.append(int(cols[6]))
        deprel.append(cols[7])
        if mwt is not None and int(wid) <= mwt_end:
            mwt[1].append(i)
        else:
            mwt = None
            surface.append((form, [i], space))
    text = meta.get("text")
    spans = _spans(text, surface, words) if text is not None else None
    if spans is None:
        text = "".join(f + (" " if sp else "") for f, _, sp in surface).rstrip(" ")
        spans = _spans(text, surface, words)
    return Sentence(sent_id=meta.get("sent_id", ""), doc_id=doc_id, text=text, words=words, upos=upos, xpos=xpos,
                    head=head, deprel=deprel, spans=spans)


def _spans(text: str, surface: list[tuple[str, list[int], bool]], words: list[str]) -> list[tuple[int, int]] | None:
    """Character span of every word, or None when a surface form is not found in order in ``text``."""
    spans: list[tuple[int, int] | None] = [None] * len(words)
    cur = 0
    for form, idx, _ in surface:
        j = text.find(form, cur)
        if j < 0 or text[cur:j].strip():
            return None
        s, e = j, j + len(form)
        cur = e
        forms = [words[i] for i in idx]
        if len(idx) > 1 and "".join(forms).lower() == form.lower():
            p = s
            for i, f in zip(idx, forms):
                spans[i] = (p, p + len(f))
                p += len(f)
        else:
            for i in idx:
                spans[i] = (s, e)
    return spans if all(sp is not None for sp in spans) else None


def ud_file(split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The verified CoNLL-U file of ``split`` (train/dev/test), via `trsae.data.locate("ud-ewt")`."""
    from trsae.data import locate

    if split not in UD_SPLITS:
        raise ValueError(f"unknown UD split {split!r}; expected one of {UD_SPLITS}")
    return next(p for p in locate("ud-ewt", data_dir) if p.name == f"en_ewt-ud-{split}.conllu")


def load_ud(split: str, max_sentences: int | None = None, data_dir: str | os.PathLike | None = None) -> list[Sentence]:
    """The first ``max_sentences`` sentences of UD EWT ``split`` in file order (whole documents first)."""
    with open(ud_file(split, data_dir), encoding="utf-8") as f:
        return list(_iter_sentences(iter(f), max_sentences))


# --------------------------------------------------------------------------------------------- labels


def log2_bucket(n: int, cap: int) -> str:
    """``1``, ``2-3``, ``4-7``, … for ``n >= 1``; everything ``>= cap`` (a power of two) is ``f"{cap}+"``."""
    if n < 1:
        raise ValueError(f"log2_bucket needs n >= 1, got {n}")
    if n >= cap:
        return f"{cap}+"
    lo = 1 << (n.bit_length() - 1)
    return "1" if lo == 1 else f"{lo}-{2 * lo - 1}"


def clause_starts(sent: Sentence) -> set[int]:
    """0-based indices of the words that open a clause: word 0, and the leftmost word of the subtree of every
    word whose relation is advcl / ccomp / acl (any subtype)."""
    children: dict[int, list[int]] = {}
    for i, h in enumerate(sent.head):
        children.setdefault(h - 1, []).append(i)
    out = {0} if sent.words else set()
    for i, rel in enumerate(sent.deprel):
        if rel.split(":")[0] in CLAUSE_RELS:
            stack, left = [i], i
            while stack:
                j = stack.pop()
                left = min(left, j)
                stack.extend(children.get(j, []))
            out.add(left)
    return out


def word_labels(sent: Sentence) -> dict[str, list[str]]:
    """Word-level labels of one sentence (every name in `LABELS` except ``abs_pos``, which needs tokens)."""
    starts = clause_starts(sent)
    out: dict[str, list[str]] = {k: [] for k in LABELS if k != "abs_pos"}
    for i in range(len(sent.words)):
        h, rel = sent.head[i], sent.deprel[i].split(":")[0]
        out["upos"].append(sent.upos[i])
        out["xpos"].append(sent.xpos[i])
        out["deprel"].append(rel)
        out["head_dir"].append("root" if h == 0 else ("left" if h - 1 < i else "right"))
        out["head_dist"].append("root" if h == 0 else log2_bucket(abs(h - 1 - i), 8))
        out["word_pos"].append(log2_bucket(i + 1, 32))
        out["connective"].append("1" if rel in CONNECTIVE_RELS else "0")
        out["clause_start"].append("1" if i in starts else "0")
    return out


# --------------------------------------------------------------------------------------------- alignment


@dataclass
class UDContexts:
    """Tokenised UD contexts and, for every word, where its last sub-token is and its labels."""

    ids: list[list[int]]
    """Token ids of each context, ``[BOS] + tokens``."""
    word_ctx: np.ndarray
    """``[N_w]`` context of each word."""
    word_tok: np.ndarray
    """``[N_w]`` index (BOS = 0) of each word's last sub-token in its context."""
    labels: dict[str, np.ndarray]
    """Name (`LABELS`) -> ``[N_w]`` string labels."""
    sentences: list[Sentence]


def tokenize_ud(tokenizer, bos_id: int, sentences: list[Sentence], pack_tokens: int | None = None) -> UDContexts:
    """Contexts of ``sentences`` and the aligned position of every word (see the module docstring).

    ``pack_tokens=None``: one sentence per context. Otherwise consecutive sentences of the same document are
    joined by a space while the context (BOS included, token counts taken per sentence) stays within
    ``pack_tokens``; a sentence longer than that gets its own context (never truncated).
    """
    groups: list[list[int]] = []
    if pack_tokens is None:
        groups = [[i] for i in range(len(sentences))]
    else:
        lens = [len(encode_with_offsets(tokenizer, " " + s.text)[0]) for s in sentences]
        cur, n = [], 1
        for i, s in enumerate(sentences):
            if cur and (sentences[cur[-1]].doc_id != s.doc_id or n + lens[i] > pack_tokens):
                groups.append(cur)
                cur, n = [], 1
            cur.append(i)
            n += lens[i]
        if cur:
            groups.append(cur)
    ids, w_ctx, w_tok = [], [], []
    labels: dict[str, list[str]] = {k: [] for k in LABELS}
    for c, group in enumerate(groups):
        text, spans = "", []
        for i in group:
            base = len(text) + (1 if text else 0)
            text = text + (" " if text else "") + sentences[i].text
            spans.extend((base + a, base + b) for a, b in sentences[i].spans)
            for k, v in word_labels(sentences[i]).items():
                labels[k].extend(v)
        tok_ids, offsets = encode_with_offsets(tokenizer, text)
        last = [t + 1 for t in last_token_indices(offsets, spans)]  # +1: BOS
        ids.append([bos_id] + tok_ids)
        w_ctx.extend([c] * len(last))
        w_tok.extend(last)
        labels["abs_pos"].extend(log2_bucket(t, 64) for t in last)
    return UDContexts(ids=ids, word_ctx=np.asarray(w_ctx, dtype=np.int64), word_tok=np.asarray(w_tok, dtype=np.int64),
                      labels={k: np.asarray(v, dtype=object) for k, v in labels.items()}, sentences=sentences)


@dataclass
class UDFeatures:
    """Features at every ordinary token of the UD contexts of one split, and the UD words' labels."""

    tokens: TokenFeatures
    word_rows: np.ndarray
    """``[N_w]`` row of ``tokens.X`` holding each word's last sub-token."""
    labels: dict[str, np.ndarray]
    """Name (`LABELS`) -> ``[N_w]`` string labels."""
    contexts: UDContexts

    @property
    def word_X(self):
        """``[N_w, F]`` features at the words' last sub-tokens."""
        return self.tokens.X[self.word_rows]


def ud_features(model, layer: int, sae=None, split: str = "dev", max_sentences: int | None = 500,
                batch_size: int = 16, pack_tokens: int | None = None, data_dir: str | os.PathLike | None = None,
                sparse: bool | None = None) -> UDFeatures:
    """Raw activations (``sae=None``) or SAE codes of ``model`` at ``layer`` over the first ``max_sentences``
    sentences of UD EWT ``split``, with every word's labels at its last sub-token (module docstring)."""
    sents = load_ud(split, max_sentences, data_dir)
    ctx = tokenize_ud(model.tokenizer, model.bos_id, sents, pack_tokens=pack_tokens)
    feats = encode_contexts(model, layer, ctx.ids, sae=sae, batch_size=batch_size, sparse=sparse)
    return UDFeatures(tokens=feats, word_rows=feats.rows(ctx.word_ctx, ctx.word_tok), labels=ctx.labels,
                      contexts=ctx)
