"""SAE training throughput against its floor, and what bounds the TopK step, measured side by side in one run.

The floor of a training step is the encoder's own matmul: tokens/s = (this machine's float32 rate for the
``[B·T, d] x [d, F]`` product, measured here) / (2·d·F). Everything else a TopK step does (the top-k selection,
the sparse decode, the sparse backward, the loss terms, Adam and the decoder renormalisation) is overhead over
it. Prints, per SAE family, tokens/s, the share of the floor it reaches, and its step time over TopK's; then the
TopK step taken apart, each piece timed alone in the same interleaved repeats (medians):

    encoder matmul   x @ W_enc + b_enc                    (the floor)
    top-k            torch.topk over the pre-activations [B·T, F]
    forward          the SAE's whole forward (loss terms included), minus the two above
    backward         loss.backward() of that forward
    optimizer        Adam, the decoder-gradient projection and the row renormalisation (train_step minus the rest)

    python benchmarks/bench_train.py --d 640 --width 5120 --k 32 --batch 8 --ctx 128 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch

from trsae.overhead import make_batch, make_config, make_optimizer, train_step
from trsae.saes import make_sae


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def topk_pieces(d: int, width: int, k: int, x_BTD: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, Callable]:
    """Callables for the pieces of one TopK training step, on one SAE (the step's own code for the whole)."""
    sae = make_sae(make_config("topk", d, width, k)).train()
    opt = make_optimizer(sae)
    x_ND = x_BTD.reshape(-1, d)
    W, b = sae.encoder.W_enc.detach(), sae.encoder.b_enc.detach()
    z_NF = torch.addmm(b, x_ND, W)

    def forward():
        return sae(x_BTD, mask_BT=mask_BT)

    def forward_backward():
        opt.zero_grad(set_to_none=True)
        forward().loss.backward()

    return {"encoder matmul": lambda: torch.addmm(b, x_ND, W), "top-k": lambda: z_NF.topk(k, dim=1, sorted=False),
            "forward": forward, "forward+backward": forward_backward,
            "step": lambda: train_step(sae, opt, x_BTD, mask_BT)}


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
    steps = {arch: (lambda arch=arch: train_step(saes[arch], opts[arch], x_BTD, mask_BT)) for arch in a.archs}
    pieces = topk_pieces(a.d, a.width, a.k, x_BTD, mask_BT)
    todo = {**{f"train {arch}": fn for arch, fn in steps.items()}, **{f"piece {k}": fn for k, fn in pieces.items()}}
    for fn in todo.values():  # warm-up
        fn()
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(a.repeats):
        for name, fn in todo.items():
            times[name].append(_time(fn))
    t = {name: statistics.median(v) for name, v in times.items()}
    mm = t["piece encoder matmul"]
    rate = 2 * n * a.d * a.width / mm / 1e9
    floor = n / mm
    print(f"float32 encoder matmul [{n}x{a.d}] @ [{a.d}x{a.width}]: {rate:.1f} GFLOP/s, {mm * 1e3:.1f} ms; "
          f"floor {floor:,.0f} tok/s (medians of {a.repeats})")
    for arch in a.archs:
        s = t[f"train {arch}"]
        rel = f"  {s / t['train topk']:.2f}x TopK's step" if "topk" in a.archs else ""
        print(f"{arch:10s} train {n / s:9,.0f} tok/s = {(n / s) / floor:5.1%} of the floor{rel}")
    step = t["piece step"]
    parts = {"encoder matmul": mm, "top-k": t["piece top-k"],
             "forward, rest": t["piece forward"] - mm - t["piece top-k"],
             "backward": t["piece forward+backward"] - t["piece forward"],
             "optimizer + renorm": step - t["piece forward+backward"]}
    print(f"TopK step {step * 1e3:.1f} ms = {mm / step:.1%} floor; its pieces:")
    for name, v in parts.items():
        print(f"  {name:20s} {v * 1e3:7.1f} ms  {v / step:6.1%} of the step  {v / mm:5.2f}x the matmul")
    bound = max((k for k in parts if k != "encoder matmul"), key=parts.get)
    print(f"largest cost beside the matmul: {bound} ({parts[bound] / step:.0%} of the step)")


if __name__ == "__main__":
    main()
