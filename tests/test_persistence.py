"""Persistence and novel L0 of the codes against a naive loop over token pairs."""

import pytest
import torch

from trsae.metrics import PersistenceAccumulator


def _naive(batches):
    kept = active = novel = pairs = 0
    by = {}
    for codes, mask, pos in batches:
        B, T, _ = codes.shape
        for b in range(B):
            for t in range(1, T):
                if not (mask[b, t] and mask[b, t - 1]):
                    continue
                now = set(torch.nonzero(codes[b, t]).flatten().tolist())
                before = set(torch.nonzero(codes[b, t - 1]).flatten().tolist())
                p = int(pos[b, t])
                lo = 1 << (p.bit_length() - 1)
                key = str(lo) if lo == 2 * lo - 1 else f"{lo}-{2 * lo - 1}"
                row = by.setdefault(key, [0, 0, 0, 0])
                step = (len(now & before), len(now), len(now - before), 1)
                by[key] = [a + s for a, s in zip(row, step)]
                kept, active, novel, pairs = kept + step[0], active + step[1], novel + step[2], pairs + 1
    return kept / active, novel / pairs, pairs, {k: (r[0] / r[1], r[2] / r[3], r[3]) for k, r in by.items()}


def test_persistence_matches_a_naive_loop_over_pairs():
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        B, T, F = 2, 12, 9
        codes = torch.rand(B, T, F, generator=gen) * (torch.rand(B, T, F, generator=gen) < 0.3)
        mask = torch.rand(B, T, generator=gen) > 0.15
        mask[:, 0] = False  # BOS
        pos = torch.arange(T).expand(B, T) + torch.randint(0, 40, (B, 1), generator=gen)  # crops start anywhere
        batches.append((codes, mask, pos))
    acc = PersistenceAccumulator()
    for b in batches:
        acc.update(*b)
    got = acc.compute()
    persistence, novel_l0, pairs, by = _naive(batches)
    assert got["persistence"] == pytest.approx(persistence) and got["novel_l0"] == pytest.approx(novel_l0)
    assert got["n_pairs"] == pairs
    assert set(got["by_position"]) == set(by)
    for key, (p, n, c) in by.items():
        row = got["by_position"][key]
        assert (row["persistence"], row["novel_l0"], row["n_pairs"]) == (pytest.approx(p), pytest.approx(n), c)


def test_identical_neighbours_persist_fully_and_disjoint_ones_not_at_all():
    same = torch.zeros(1, 5, 4)
    same[..., :2] = 1.0
    acc = PersistenceAccumulator()
    acc.update(same, torch.ones(1, 5, dtype=torch.bool), torch.arange(5)[None])
    assert acc.compute()["persistence"] == 1.0 and acc.compute()["novel_l0"] == 0.0
    alt = torch.zeros(1, 4, 4)
    alt[0, ::2, 0] = 1.0
    alt[0, 1::2, 1] = 1.0
    acc = PersistenceAccumulator()
    acc.update(alt, torch.ones(1, 4, dtype=torch.bool), torch.arange(4)[None])
    assert acc.compute()["persistence"] == 0.0 and acc.compute()["novel_l0"] == 1.0
