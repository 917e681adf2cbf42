"""Temporal structure of the codes: how much of a token's support its predecessor already had.

For consecutive ordinary tokens t−1, t of one sequence (both valid), with S_t = supp f_t:

- ``persistence`` = Σ |S_t ∩ S_{t−1}| / Σ |S_t|: the share of active codes at t that were active at t−1 (pooled
  over all pairs);
- ``novel_l0`` = mean |S_t \\ S_{t−1}|: codes that switch on at t;
- ``by_position``: both again for the pairs whose t falls in each position bucket (1, 2–3, 4–7, …, powers of two,
  `POSITION_BUCKETS`), with ``n_pairs`` per bucket.

Position is the token's index in its stored sequence (BOS at 0), as the SAEs see it.
"""

from __future__ import annotations

from typing import Any

import torch

POSITION_BUCKETS: tuple[tuple[int, int], ...] = tuple((2 ** i, 2 ** (i + 1) - 1) for i in range(16))
"""Inclusive ranges of t: (1, 1), (2, 3), (4, 7), …"""


def bucket_name(lo: int, hi: int) -> str:
    """A `POSITION_BUCKETS` range as a key: ``"1"``, ``"2-3"``."""
    return str(lo) if lo == hi else f"{lo}-{hi}"


class PersistenceAccumulator:
    """``update(codes_BTF, mask_BT, pos_BT)`` over batches of whole (or cropped) sequences; ``compute()``."""

    def __init__(self) -> None:
        n = len(POSITION_BUCKETS)
        self.active = torch.zeros(n, dtype=torch.float64)  # Σ |S_t| per bucket
        self.kept = torch.zeros(n, dtype=torch.float64)  # Σ |S_t ∩ S_{t−1}|
        self.novel = torch.zeros(n, dtype=torch.float64)  # Σ |S_t \ S_{t−1}|
        self.pairs = torch.zeros(n, dtype=torch.float64)

    @torch.no_grad()
    def update(self, codes_BTF: torch.Tensor, mask_BT: torch.Tensor, pos_BT: torch.Tensor) -> None:
        on_BTF = codes_BTF.detach().to("cpu") != 0
        prev, cur = on_BTF[:, :-1], on_BTF[:, 1:]
        mask = mask_BT.to("cpu").bool()
        pair_BT = mask[:, :-1] & mask[:, 1:]
        t_BT = pos_BT.to("cpu")[:, 1:]
        act_BT = cur.sum(-1).double()
        kept_BT = (cur & prev).sum(-1).double()
        for j, (lo, hi) in enumerate(POSITION_BUCKETS):
            sel = pair_BT & (t_BT >= lo) & (t_BT <= hi)
            if sel.any():
                self.active[j] += act_BT[sel].sum()
                self.kept[j] += kept_BT[sel].sum()
                self.novel[j] += (act_BT[sel] - kept_BT[sel]).sum()
                self.pairs[j] += sel.sum()

    def compute(self) -> dict[str, Any]:
        """``{"persistence", "novel_l0", "n_pairs", "by_position": {bucket: {...}}}`` (None where undefined)."""
        def stats(active, kept, novel, pairs):
            return {"persistence": float(kept / active) if active > 0 else None,
                    "novel_l0": float(novel / pairs) if pairs > 0 else None, "n_pairs": int(pairs)}
        out = stats(self.active.sum(), self.kept.sum(), self.novel.sum(), self.pairs.sum())
        out["by_position"] = {bucket_name(lo, hi): stats(self.active[j], self.kept[j], self.novel[j], self.pairs[j])
                              for j, (lo, hi) in enumerate(POSITION_BUCKETS) if self.pairs[j] > 0}
        return out
