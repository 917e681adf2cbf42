"""Helpers shared by the metric accumulators: flatten leading dims, a token mask over them, a guarded ratio."""

from __future__ import annotations

import math

import numpy as np
import torch


def flatten(t: torch.Tensor, n_trailing: int) -> torch.Tensor:
    """[..., *trailing] -> [N, *trailing]."""
    lead = t.shape[: t.dim() - n_trailing]
    return t.reshape(int(np.prod(lead, dtype=np.int64)) if len(lead) else 1, *t.shape[t.dim() - n_trailing:])


def flat_mask(mask: torch.Tensor | None, n: int, lead_shape: torch.Size) -> torch.Tensor:
    """Boolean mask over the flattened leading dims; ``None`` means every token is valid."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool)
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match leading dims {tuple(lead_shape)}")
    return mask.reshape(-1).to(device="cpu", dtype=torch.bool)


def ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when ``den`` is 0 or not finite (an undefined score)."""
    return None if den == 0 or not math.isfinite(den) else num / den


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or kept in float64 where it is (a float64 store's computation stays float64 throughout)."""
    return t if t.dtype == torch.float64 else t.float()
