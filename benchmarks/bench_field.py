"""Training and inference cost of the field's temporal SAEs and the selective temporal decoder, side by side.

For the SAEs of `trsae.experiments.temporal_specs` (TopK, Matryoshka, TRSAE) and `trsae.experiments.field_specs`
(T-SAE, TFA, TFA (matched), TRSAE-pred) at one shape, on random activations: the median seconds of a training step
(`trsae.train.train_step`: forward, backward, Adam, decoder projection and renormalisation) and of an inference
encode, and each as a ratio to TopK's, measured interleaved in one run (this machine is shared and noisy: read the
ratios).

    python benchmarks/bench_field.py --d 640 --width-mult 8 --k 32 --batch 8 --ctx 128 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trsae import experiments
from trsae.overhead import encode_step, make_batch, make_optimizer, train_step
from trsae.saes import make_sae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--width-mult", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    width = a.width_mult * a.d
    base = experiments.temporal_specs(a.d, width, a.k, a.window)
    specs = {n: base[n] for n in ("TopK", "Matryoshka", "TRSAE")} | experiments.field_specs(a.d, width, a.k, a.window)
    x_BTD, mask_BT = make_batch(a.batch, a.ctx, a.d)
    saes = {n: make_sae(c) for n, c in specs.items()}
    opts = {n: make_optimizer(s) for n, s in saes.items()}

    def step(name: str) -> None:  # the trainer's own step (decoder projection and renormalisation included)
        train_step(saes[name], opts[name], x_BTD, mask_BT)

    def encode(name: str) -> None:
        encode_step(saes[name], x_BTD, mask_BT)

    times: dict[str, dict[str, list[float]]] = {n: {"train": [], "encode": []} for n in saes}
    for name in saes:  # warm-up
        step(name)
        encode(name)
    for _ in range(a.repeats):
        for name in saes:
            for kind, fn in (("train", step), ("encode", encode)):
                t = time.perf_counter()
                fn(name)
                times[name][kind].append(time.perf_counter() - t)
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    n_tok = a.batch * a.ctx
    print(f"d={a.d} F={width} k={a.k} window={a.window}, {n_tok} tokens a batch, median of {a.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'SAE':16s} {'train s':>8s} {'x TopK':>7s} {'encode s':>9s} {'x TopK':>7s} {'train tok/s':>12s}")
    for name, m in med.items():
        print(f"{name:16s} {m['train']:8.3f} {m['train'] / med['TopK']['train']:7.2f} {m['encode']:9.3f} "
              f"{m['encode'] / med['TopK']['encode']:7.2f} {n_tok / m['train']:12.0f}")


if __name__ == "__main__":
    main()
