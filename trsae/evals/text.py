"""Text to model inputs, shared by the evaluations: tokenise with character offsets, find the token that holds a
character, batch texts of similar length, right-pad them, and read a layer's activations (or an SAE's codes)
at every ordinary token of a list of contexts.

A context is a list of token ids starting with BOS. Batches are right-padded: with a causal model the real tokens
never attend to the padding and keep their positions, so a batched result equals the unbatched one.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from trsae.metrics.common import wide


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens added) and their character offsets."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def last_token_indices(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """For each character span ``[s, e)``, the index (into ``offsets``) of the token containing char ``e - 1``.

    ``offsets`` are the tokens' ``[start, end)`` character spans in order (a fast tokenizer's
    ``offset_mapping``; a leading space belongs to the token, as in GPT-2's ``Ġknow``)."""
    starts = [a for a, _ in offsets]
    out = []
    for s, e in spans:
        t = bisect.bisect_right(starts, e - 1) - 1
        if t < 0 or not offsets[t][0] <= e - 1 < max(offsets[t][1], offsets[t][0] + 1):
            raise ValueError(f"span {(s, e)} is not covered by the tokens (offsets {offsets[:8]}…)")
        out.append(t)
    return out


def batch_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, stable), to limit padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_right(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids_BT`` right-padded with ``pad_id`` and ``valid_BT`` (False on padding). With a causal model and
    right padding the real tokens never see the padding, and their positions are unchanged."""
    T = max(len(x) for x in ids)
    ids_BT = torch.full((len(ids), T), pad_id, dtype=torch.long)
    valid_BT = torch.zeros((len(ids), T), dtype=torch.bool)
    for b, x in enumerate(ids):
        ids_BT[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        valid_BT[b, :len(x)] = True
    return ids_BT, valid_BT


def pad_id_of(model) -> int:
    tok = model.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else model.bos_id


@dataclass
class TokenFeatures:
    """Features at every ordinary (non-special) token of a list of contexts, rows in context then token order."""

    X: object
    """``[N, F]`` SAE codes (``scipy.sparse.csr_matrix``) or raw activations (``np.ndarray``): float32, or float64
    from a float64 model."""
    seq: np.ndarray
    """``[N]`` context index of each row."""
    tok: np.ndarray
    """``[N]`` token index (BOS = 0) of each row in its context."""
    token_id: np.ndarray
    """``[N]`` token id of each row."""
    ids: list[list[int]]
    """The contexts' token ids."""

    def rows(self, ctx: np.ndarray, tok: np.ndarray) -> np.ndarray:
        """Row of each (context, token index) pair; raises KeyError for a special token (it has no row)."""
        width = max(len(x) for x in self.ids) + 1
        keys = self.seq * width + self.tok  # sorted: rows are in context then token order
        want = np.asarray(ctx) * width + np.asarray(tok)
        r = np.searchsorted(keys, want)
        bad = (r >= len(keys)) | (keys[np.minimum(r, len(keys) - 1)] != want)
        if bad.any():
            raise KeyError(f"{int(bad.sum())} requested positions are special tokens or out of range")
        return r


_ACTS_MEMO: dict | None = None


@contextlib.contextmanager
def reuse_layer_acts():
    """Within the block, `encode_contexts` runs the model once per distinct (model, layer, padded batch of ids) and
    reuses those activations for every later call: notebook 04 encodes the same texts for the clean model and for
    each SAE, whose codes differ while the model's activations do not. The memo lives until the outermost block
    ends (it holds every batch's activations: tens of MB for notebook 04's text sets)."""
    global _ACTS_MEMO
    outer = _ACTS_MEMO
    _ACTS_MEMO = {} if outer is None else outer
    try:
        yield
    finally:
        _ACTS_MEMO = outer


def _layer_acts(model, layer: int, ids_BT: torch.Tensor) -> torch.Tensor:
    from trsae.lm import layer_acts

    if _ACTS_MEMO is None:
        return wide(layer_acts(model, layer, ids_BT))
    key = (model.name, layer, tuple(ids_BT.shape), hashlib.sha1(ids_BT.numpy().tobytes()).hexdigest())
    if key not in _ACTS_MEMO:
        _ACTS_MEMO[key] = wide(layer_acts(model, layer, ids_BT))
    return _ACTS_MEMO[key]


@torch.no_grad()
def encode_contexts(model, layer: int, ids: list[list[int]], sae=None, batch_size: int = 16,
                    sparse: bool | None = None) -> TokenFeatures:
    """Layer ``layer`` residual (``sae=None``) or SAE codes at every ordinary token of every context.

    SAE codes are ``sae.encode(acts * sae.cfg.input_scale, pos_BT, mask_BT)`` with ``pos_BT`` the token index
    (BOS = 0) and ``mask_BT`` False on special tokens and padding. ``sparse`` (default: True for an SAE) stores
    the rows as a CSR matrix. Contexts are batched by length and right-padded (see `pad_right`). Inside
    `reuse_layer_acts` the model's activations of a batch seen before are reused.
    """
    import scipy.sparse as sp

    sparse = sae is not None if sparse is None else sparse
    pad = pad_id_of(model)
    per_ctx: dict[int, object] = {}
    for batch in batch_by_length([len(x) for x in ids], batch_size):
        ids_BT, valid_BT = pad_right([ids[i] for i in batch], pad)
        mask_BT = model.special_mask(ids_BT) & valid_BT
        acts_BTD = _layer_acts(model, layer, ids_BT)
        if sae is not None:
            pos_BT = torch.arange(ids_BT.shape[1]).expand_as(ids_BT)
            feats_BTF = sae.encode(acts_BTD * sae.cfg.input_scale, pos_BT=pos_BT, mask_BT=mask_BT)
        else:
            feats_BTF = acts_BTD
        for b, i in enumerate(batch):
            rows = wide(feats_BTF[b][mask_BT[b]]).numpy()
            per_ctx[i] = sp.csr_matrix(rows) if sparse else rows
    seq, tok, tid = [], [], []
    for i, x in enumerate(ids):
        ids_T = torch.tensor(x, dtype=torch.long)
        t = torch.nonzero(model.special_mask(ids_T)).flatten().numpy()
        seq.append(np.full(len(t), i, dtype=np.int64))
        tok.append(t.astype(np.int64))
        tid.append(ids_T.numpy()[t])
    blocks = [per_ctx[i] for i in range(len(ids))]
    X = sp.vstack(blocks, format="csr") if sparse else np.concatenate(blocks, axis=0)
    return TokenFeatures(X=X, seq=np.concatenate(seq), tok=np.concatenate(tok), token_id=np.concatenate(tid),
                         ids=ids)
