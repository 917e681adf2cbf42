"""The CUDA path end to end, for a machine with a GPU; on one without, a single line and exit 0.

Per model (default tiny-gpt2, then gemma-3-270m): a harvest with the model on the GPU in bfloat16 (the store in
float32), TopK and TopK TRSAE trained on the GPU under bfloat16 autocast and, beside them, on the CPU in float32;
all four evaluated with the LM's passes on the GPU (the SAEs, spliced into them, and the scores on the CPU). The
GPU- and CPU-trained SAEs' test EV should agree to about 0.02. Then, with two GPUs, the two-process NCCL run under torchrun
against the one-process run on the same store (the 1-vs-2-process parity `tests/test_distributed.py` checks with
gloo on CPU); with one GPU that step says so and is skipped. Last, TRSAE vs TopK training throughput on the GPU
at d = 2304, F = 16·d (Gemma-2-2B's width), forward + backward + Adam on random activations:

    python benchmarks/device_check.py [--models tiny-gpt2 gemma-3-270m] [--tokens 40000] [--steps 30]

Everything it writes goes to a temporary folder. It exits non-zero at the first step that fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trsae.device import no_cuda


def _say(msg: str) -> None:
    print(msg, flush=True)


def check_model(name: str, work: Path, tokens: int, steps: int) -> None:
    from trsae import experiments
    from trsae.config import HarvestConfig, TrainConfig
    from trsae.evaluate import evaluate_saes
    from trsae.lm import load_model
    from trsae.store import harvest
    from trsae.train import train_sae

    layer = 1 if name == "tiny-gpt2" else 6
    cfg = HarvestConfig(model=name, layer=layer, data="brown", tokens=tokens, ctx_len=128, device="cuda",
                        model_dtype="bfloat16")
    t = time.perf_counter()
    store = harvest(cfg, work / f"store-{name}", progress=False)
    _say(f"{name}: harvested {store.n_tokens('train'):,} training tokens at L{layer} in bfloat16 on the GPU "
         f"({time.perf_counter() - t:.1f} s)")
    specs = experiments.temporal_specs(store.d_model, 8 * store.d_model, 32, window=16, curriculum_frac=0.3)
    tokens_per_step = 32 * 32
    results = {}
    model = load_model(name, device="cuda", dtype=torch.float32)
    for device, amp in (("cuda", "bfloat16"), ("cpu", None)):
        tc = TrainConfig(tokens=steps * tokens_per_step, batch_size=32, crop_len=32, context=16, lr=1.6e-3,
                         device=device, amp=amp)
        saes = {}
        for family in ("TopK", "TRSAE"):
            t = time.perf_counter()
            saes[family] = train_sae(specs[family], tc, store, work / f"run-{name}-{family}-{device}",
                                     progress=False)
            _say(f"{name}: {family} trained {steps} steps on {device}{' under ' + amp + ' autocast' if amp else ''} "
                 f"({time.perf_counter() - t:.1f} s)")
        results[device] = evaluate_saes(saes, store, model=model, max_seqs=4, density_tokens=4096)
    for family in ("TopK", "TRSAE"):
        gpu, cpu = (results[d][family] for d in ("cuda", "cpu"))
        ev = [r["reconstruction_quality"]["explained_variance"] for r in (gpu, cpu)]
        ce = [r["model_performance_preservation"]["ce_loss_score"] for r in (gpu, cpu)]
        _say(f"{name}: {family} test EV GPU {ev[0]:.4f} / CPU {ev[1]:.4f}, CE-loss score GPU {ce[0]:.4f} / "
             f"CPU {ce[1]:.4f}")
        if abs(ev[0] - ev[1]) > 0.02:
            raise SystemExit(f"{name}: {family}'s EV on the GPU and the CPU differ by more than 0.02")


def check_two_processes(work: Path) -> None:
    if torch.cuda.device_count() < 2:
        _say(f"two-process NCCL parity: skipped, {torch.cuda.device_count()} GPU visible (NCCL needs one per process)")
        return
    store = work / "store-tiny-gpt2"
    outs = {}
    for n in (1, 2):
        out = work / f"run-ddp-{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "-m", "trsae", "train",
               "--store", str(store), "--sparsity", "topk", "--k", "8", "--width", "512", "--tokens", "32768",
               "--batch-size", "32", "--crop-len", "32", "--device", "cuda", "--quiet", "--out", str(out)]
        subprocess.run(cmd, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        outs[n] = out
    from trsae.saes import load_sae

    one, two = (load_sae(outs[n] / "sae") for n in (1, 2))
    diff = max((a - b).abs().max().item() for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    _say(f"two-process NCCL parity: largest weight difference between 1 and 2 processes {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("the two-process run drifted from the one-process run by more than 1e-3")


def throughput(d: int, steps: int) -> None:
    from trsae.overhead import make_batch, make_config, make_optimizer
    from trsae.saes import make_sae
    from trsae.train import train_step

    x_BTD, mask_BT = make_batch(16, 256, d, device="cuda")
    dead_F = torch.zeros(16 * d, dtype=torch.bool, device="cuda")
    rate = {}
    for arch in ("topk", "trsae"):
        sae = make_sae(make_config(arch, d, 16 * d, 64)).to("cuda")
        opt = make_optimizer(sae)
        for _ in range(3):
            train_step(sae, opt, x_BTD, mask_BT, dead_F=dead_F, amp=torch.bfloat16)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            train_step(sae, opt, x_BTD, mask_BT, dead_F=dead_F, amp=torch.bfloat16)
        torch.cuda.synchronize()
        rate[arch] = steps * x_BTD.shape[0] * x_BTD.shape[1] / (time.perf_counter() - t)
    _say(f"training at d = {d}, F = {16 * d} under bfloat16 autocast: TopK {rate['topk']:,.0f} tok/s, TRSAE "
         f"{rate['trsae']:,.0f} tok/s ({rate['topk'] / rate['trsae']:.2f}x TRSAE's step time over TopK's)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny-gpt2", "gemma-3-270m"])
    p.add_argument("--tokens", type=int, default=40_000, help="tokens harvested per model")
    p.add_argument("--steps", type=int, default=30, help="training steps per SAE")
    p.add_argument("--d", type=int, default=2304, help="d of the throughput check (F = 16 d)")
    a = p.parse_args()
    why = no_cuda()
    if why is not None:
        print(f"device_check: no CUDA device visible to {why}; nothing to check on this machine")
        return 0
    _say(f"device_check on {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), torch "
         f"{torch.__version__}, CUDA {torch.version.cuda}")
    with tempfile.TemporaryDirectory(prefix="trsae-device-") as tmp:
        work = Path(tmp)
        for name in a.models:
            check_model(name, work, a.tokens, a.steps)
        check_two_processes(work)
        throughput(a.d, a.steps)
    _say("device_check: every step ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
