"""SAE training throughput against this machine's float32 matmul rate, measured in the same run.

Prints, for a TopK (and optionally other) SAE training step on random activations of the given shape:
tokens/s, achieved GFLOP/s (FLOPs from `trsae.overhead.flops_per_token`, which counts what the code runs), the
dense float32 matmul GFLOP/s of a [B·T, d] x [d, F] product (the encoder's own shape), and their ratio
(target: TopK training at >= 60 % of the matmul rate). Repeats are interleaved; medians are reported.

    python benchmarks/bench_train.py --d 640 --width 5120 --k 32 --batch 8 --ctx 128 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trsae.overhead import flops_per_token, make_batch, make_config, make_optimizer, train_step
from trsae.saes import make_sae


def matmul_gflops(n: int, d: int, f: int) -> float:
    a, b = torch.randn(n, d), torch.randn(d, f)
    a @ b
    t = time.perf_counter()
    a @ b
    return 2 * n * d * f / (time.perf_counter() - t) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--width", type=int, default=5120)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--archs", nargs="+", default=["topk", "batchtopk", "relu", "trsae"])
    a = p.parse_args()
    n = a.batch * a.ctx
    x_BTD, mask_BT = make_batch(a.batch, a.ctx, a.d)
    saes = {arch: make_sae(make_config(arch, a.d, a.width, a.k)) for arch in a.archs}
    opts = {arch: make_optimizer(s) for arch, s in saes.items()}
    for arch in a.archs:  # warm-up
        train_step(saes[arch], opts[arch], x_BTD, mask_BT)
    times = {arch: [] for arch in a.archs}
    mm = []
    for _ in range(a.repeats):
        mm.append(matmul_gflops(n, a.d, a.width))
        for arch in a.archs:
            t = time.perf_counter()
            train_step(saes[arch], opts[arch], x_BTD, mask_BT)
            times[arch].append(time.perf_counter() - t)
    peak = statistics.median(mm)
    print(f"float32 matmul [{n}x{a.d}] @ [{a.d}x{a.width}]: {peak:.1f} GFLOP/s (median of {a.repeats})")
    for arch in a.archs:
        t = statistics.median(times[arch])
        fl = flops_per_token(saes[arch].cfg, train=True, n_tokens=n) * n
        print(f"{arch:10s} train {n / t:9.0f} tok/s  {fl / t / 1e9:7.1f} GFLOP/s  = {fl / t / 1e9 / peak:5.1%} "
              f"of matmul  ({fl / n / 1e6:.2f} MFLOP/token)")


if __name__ == "__main__":
    main()
