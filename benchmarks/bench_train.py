"""SAE training throughput against its floor, and what bounds the TopK step, measured side by side in one run.

The floor of a training step is the encoder's own matmul: tokens/s = (this machine's float32 rate for the
``[B·T, d] x [d, F]`` product, measured here) / (2·d·F). Everything else a TopK step does (the top-k selection,
the sparse decode, the sparse backward, the AuxK loss over dead latents, the loss terms, Adam and the decoder
renormalisation) is overhead over it. The steps are the trainer's (`trsae.train.train_step`), with the AuxK loss
over ``--dead-frac`` of the latents, as the trainer runs it once latents go unfired for its dead window (a quarter
to a third of them, mid-run, on the cpu profile's store: the ``dead_frac`` of a run's ``metrics.jsonl``);
``--dead-frac 0`` gives the step without it. Prints, per SAE family, tokens/s, the share of the floor it reaches,
and its step time over TopK's; then the TopK step taken apart, each piece timed alone in the same interleaved
repeats (medians):

    encoder matmul   x @ W_enc + b_enc                    (the floor)
    top-k            torch.topk over the pre-activations [B·T, F]
    forward          the SAE's whole forward without AuxK (loss terms included), minus the two above
    backward         loss.backward() of that forward
    AuxK             what the AuxK loss adds to forward + backward (its top-k_aux over the dead latents, the
                     k_aux = d/2 codes' decode and their gradients)
    optimizer        Adam, the decoder-gradient projection and the row renormalisation (train_step minus the rest)

and the encoder's weight gradient over the step's pairs (TopK's and AuxK's) two ways: `torch.sparse.mm` of the
pair matrix, and the per-latent embedding-bags the trainer uses (`trsae.saes.sparse_ops.LatentOrder`).

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
from trsae.saes.sparse_ops import LatentOrder


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def topk_pieces(d: int, width: int, k: int, x_BTD: torch.Tensor, mask_BT: torch.Tensor,
                dead_F: torch.Tensor | None) -> dict[str, Callable]:
    """Callables for the pieces of one TopK training step, on one SAE (the step's own code for the whole)."""
    sae = make_sae(make_config("topk", d, width, k)).train()
    opt = make_optimizer(sae)
    x_ND = x_BTD.reshape(-1, d)
    W, b = sae.encoder.W_enc.detach(), sae.encoder.b_enc.detach()
    z_NF = torch.addmm(b, x_ND, W)

    def forward(dead=None):
        return sae(x_BTD, mask_BT=mask_BT, dead_F=dead)

    def forward_backward(dead=None):
        opt.zero_grad(set_to_none=True)
        forward(dead).loss.backward()

    pieces = {"encoder matmul": lambda: torch.addmm(b, x_ND, W), "top-k": lambda: z_NF.topk(k, dim=1, sorted=False),
              "forward": forward, "forward+backward": forward_backward,
              "step": lambda: train_step(sae, opt, x_BTD, mask_BT, dead_F=dead_F)}
    if dead_F is not None:
        pieces["forward+backward+auxk"] = lambda: forward_backward(dead_F)
    return pieces


def weight_grad_pieces(d: int, width: int, k: int, x_BTD: torch.Tensor, mask_BT: torch.Tensor,
                       dead_F: torch.Tensor | None) -> dict[str, Callable]:
    """The encoder weight gradient over one step's pairs (TopK's, then AuxK's), by `torch.sparse.mm` and by the
    trainer's per-latent embedding-bags, on the pairs a TopK SAE selects from this batch."""
    sae = make_sae(make_config("topk", d, width, k)).train()
    with torch.no_grad():
        st = sae.encoder.prepare(x_BTD, None, mask_BT, sae.b_dec)
        codes = sae.sparsity.codes(sae.encoder, st, dead_F=dead_F)
    rows, cols = codes.rows_M, codes.cols_M
    if codes.aux is not None:
        rows, cols = torch.cat([rows, codes.aux[0]]), torch.cat([cols, codes.aux[1]])
    g_M = torch.randn(rows.numel())
    x_ND = x_BTD.reshape(-1, d)
    n = x_ND.shape[0]

    def by_sparse_mm():
        G_FN = torch.sparse_coo_tensor(torch.stack([cols, rows]), g_M, (width, n), check_invariants=False)
        return torch.sparse.mm(G_FN, x_ND)

    return {"sparse.mm": by_sparse_mm, "latent bags": lambda: LatentOrder(rows, cols, g_M, width).sums(x_ND)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--width", type=int, default=5120)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--archs", nargs="+", default=["topk", "batchtopk", "relu", "trsae"])
    p.add_argument("--dead-frac", type=float, default=0.25,
                   help="share of the latents the AuxK loss treats as dead in every step (0: no AuxK)")
    a = p.parse_args()
    if not 0 <= a.dead_frac < 1:
        p.error(f"--dead-frac must be in [0, 1), got {a.dead_frac}")
    n = a.batch * a.ctx
    x_BTD, mask_BT = make_batch(a.batch, a.ctx, a.d)
    dead_F = None
    if a.dead_frac > 0:  # a fixed random set, as many as the trainer's dead window leaves mid-run
        dead_F = torch.zeros(a.width, dtype=torch.bool)
        order = torch.randperm(a.width, generator=torch.Generator().manual_seed(0))
        dead_F[order[:round(a.dead_frac * a.width)]] = True
    saes = {arch: make_sae(make_config(arch, a.d, a.width, a.k)) for arch in a.archs}
    opts = {arch: make_optimizer(s) for arch, s in saes.items()}
    steps = {arch: (lambda arch=arch: train_step(saes[arch], opts[arch], x_BTD, mask_BT, dead_F=dead_F))
             for arch in a.archs}
    pieces = topk_pieces(a.d, a.width, a.k, x_BTD, mask_BT, dead_F)
    grads = weight_grad_pieces(a.d, a.width, a.k, x_BTD, mask_BT, dead_F)
    todo = {**{f"train {arch}": fn for arch, fn in steps.items()}, **{f"piece {k}": fn for k, fn in pieces.items()},
            **{f"grad {k}": fn for k, fn in grads.items()}}
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
    fb = t.get("piece forward+backward+auxk", t["piece forward+backward"])
    parts = {"encoder matmul": mm, "top-k": t["piece top-k"],
             "forward, rest": t["piece forward"] - mm - t["piece top-k"],
             "backward": t["piece forward+backward"] - t["piece forward"],
             "AuxK": fb - t["piece forward+backward"],
             "optimizer + renorm": step - fb}
    aux = f"AuxK over {a.dead_frac:.0%} of the latents" if dead_F is not None else "no AuxK"
    print(f"TopK step ({aux}) {step * 1e3:.1f} ms = {mm / step:.1%} floor; its pieces:")
    for name, v in parts.items():
        print(f"  {name:20s} {v * 1e3:7.1f} ms  {v / step:6.1%} of the step  {v / mm:5.2f}x the matmul")
    bound = max((k for k in parts if k != "encoder matmul"), key=parts.get)
    print(f"largest cost beside the matmul: {bound} ({parts[bound] / step:.0%} of the step)")
    sp, bags = t["grad sparse.mm"], t["grad latent bags"]
    print(f"encoder weight gradient over the step's pairs: sparse.mm {sp * 1e3:.1f} ms, latent bags (the trainer's) "
          f"{bags * 1e3:.1f} ms = {sp / bags:.2f}x faster")


if __name__ == "__main__":
    main()
