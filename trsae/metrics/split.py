"""Where an SAE's CE gap lives: the excess next-token cross-entropy of the SAE-spliced run over the clean one,
split by the position of the token read and by how frequent that token is.

At a scored position t (`trsae.metrics.next_token_targets`: it reads an ordinary token and predicts one) the
excess is CE_sae(t) − CE_clean(t), both in nats; its sum over the positions of a split, divided by the sum over
all positions, is that split's share of the SAE's CE gap (the numerator of 1 − ``ce_loss_score``). Two SAEs'
excess sums over the same positions give their CE-gap ratio on that split (the zero-ablation denominator cancels).

- ``by_position``: t's index in its stored sequence (BOS at 0), in the buckets of
  `trsae.metrics.persistence.POSITION_BUCKETS` (1, 2–3, 4–7, …);
- ``by_frequency``: the token read at t, by its count among the ordinary tokens of the store's training split
  (`frequency_classes`).
"""

from __future__ import annotations

from typing import Any

import torch

from trsae.metrics.persistence import POSITION_BUCKETS, bucket_name

FREQUENCY_CLASSES: tuple[tuple[str, float], ...] = (("frequent", 0.5), ("middle", 0.9), ("rare", 1.0))
"""Token types, most frequent first, by the share of the training tokens that the types before them make up:
below one half ("frequent": the few types that make up the first half of the tokens), below 0.9 ("middle"), the
rest ("rare": the types of the last tenth, and every type never seen in training)."""


def frequency_classes(counts: torch.Tensor) -> torch.Tensor:
    """The `FREQUENCY_CLASSES` index of every token id from its training count (``counts``, indexed by id, e.g.
    `trsae.store.ActivationStore.token_counts`), ``[len(counts)]`` int64; `token_classes` reads it for any id.
    Ties in count are broken by id, so the classes are a function of the counts alone."""
    c = counts.double()
    vocab = len(c)
    total = c.sum()
    if total <= 0:
        raise ValueError("no token was counted: the frequency classes need the training split's token counts")
    order = torch.argsort(-c, stable=True)
    before = (torch.cumsum(c[order], 0) - c[order]) / total  # the share of the tokens of more frequent types
    cls_sorted = torch.full((vocab,), len(FREQUENCY_CLASSES) - 1, dtype=torch.long)
    for j in reversed(range(len(FREQUENCY_CLASSES) - 1)):
        cls_sorted[before < FREQUENCY_CLASSES[j][1]] = j
    cls_sorted[c[order] == 0] = len(FREQUENCY_CLASSES) - 1
    out = torch.empty(vocab, dtype=torch.long)
    out[order] = cls_sorted
    return out


def token_classes(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The class of each id in ``ids`` from a `frequency_classes` table; an id past its end was never counted, so
    it is "rare"."""
    ids = ids.long()
    inside = ids < len(table)
    return torch.where(inside, table[ids.clamp(0, len(table) - 1)], len(FREQUENCY_CLASSES) - 1)


class ExcessCEAccumulator:
    """``update(ce_sae_N, ce_clean_N, pos_N, class_N)`` over the scored positions of each batch (CE in nats, the
    position read, the `frequency_classes` index of the token read); ``compute()``."""

    def __init__(self) -> None:
        self.by_position = torch.zeros(len(POSITION_BUCKETS), 2, dtype=torch.float64)  # Σ excess, n
        self.by_frequency = torch.zeros(len(FREQUENCY_CLASSES), 2, dtype=torch.float64)

    @torch.no_grad()
    def update(self, ce_sae_N: torch.Tensor, ce_clean_N: torch.Tensor, pos_N: torch.Tensor,
               class_N: torch.Tensor) -> None:
        if not (len(ce_sae_N) == len(ce_clean_N) == len(pos_N) == len(class_N)):
            raise ValueError("the CE, position and class tensors must have one entry per scored position")
        excess = (ce_sae_N.double() - ce_clean_N.double()).cpu()
        pos, cls = pos_N.cpu().long(), class_N.cpu().long()
        for j, (lo, hi) in enumerate(POSITION_BUCKETS):
            sel = (pos >= lo) & (pos <= hi)
            self.by_position[j] += torch.stack([excess[sel].sum(), sel.sum().double()])
        for j in range(len(FREQUENCY_CLASSES)):
            sel = cls == j
            self.by_frequency[j] += torch.stack([excess[sel].sum(), sel.sum().double()])

    def compute(self) -> dict[str, Any]:
        """``{"by_position": {bucket: {"excess", "n"}}, "by_frequency": {class: {"excess", "n"}}}``: summed excess
        CE (nats) and positions of each non-empty split."""
        def rows(t, names):
            return {name: {"excess": float(t[j, 0]), "n": int(t[j, 1])} for j, name in enumerate(names) if t[j, 1] > 0}
        return {"by_position": rows(self.by_position, [bucket_name(lo, hi) for lo, hi in POSITION_BUCKETS]),
                "by_frequency": rows(self.by_frequency, [name for name, _ in FREQUENCY_CLASSES])}
