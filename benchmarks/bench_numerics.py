"""What the pinned CPU numerics of ``notebooks/numerics.env`` cost, and that they change the bits.

Trains the project's TopK SAE for a few steps on random activations in a fresh process per setting (the
variables are read when MKL and PyTorch start), alternating the settings for ``--repeats`` rounds (this machine
is shared and noisy: read the ratio of medians). Prints each setting's median seconds, its ratio to the
unpinned run, and a hash of the trained weights: the pinned hash should equal itself on every Intel CPU with AVX2,
the unpinned one differs between CPUs that pick different kernels.

    python benchmarks/bench_numerics.py --steps 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
from refresh import numerics_env  # noqa: E402

CHILD = """
import hashlib, json, sys, time
import torch
from trsae import experiments
from trsae.overhead import make_batch
from trsae.saes import make_sae

d, steps = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
sae = make_sae(experiments.temporal_specs(d, 8 * d, 32, 16)["TopK"]).train()
opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
x_BTD, mask_BT = make_batch(8, 128, d)
t0 = time.perf_counter()
for _ in range(steps):
    opt.zero_grad(set_to_none=True)
    sae(x_BTD, mask_BT=mask_BT).loss.backward()
    opt.step()
dt = time.perf_counter() - t0
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in sae.parameters())).hexdigest()[:16]
print(json.dumps({"seconds": dt, "hash": h, "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def run(env: dict[str, str], d: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(d), str(steps)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    pinned = numerics_env()
    base = {k: v for k, v in os.environ.items() if k not in pinned}
    settings = {"unpinned": base, "pinned": {**base, **pinned}}
    results = {name: [] for name in settings}
    for _ in range(a.repeats):
        for name, env in settings.items():
            results[name].append(run(env, a.d, a.steps))
    ref = statistics.median(r["seconds"] for r in results["unpinned"])
    for name, rs in results.items():
        med = statistics.median(r["seconds"] for r in rs)
        hashes = sorted({r["hash"] for r in rs})
        print(f"{name:9s} {rs[0]['capability']:7s} median {med:6.2f} s  x{med / ref:4.2f}  weights {', '.join(hashes)}")


if __name__ == "__main__":
    main()
