"""What float64 costs, and what it buys: a TopK SAE trained for a few steps in float32 and in float64, each under this
machine's own kernels and under ``notebooks/other_cpu.env`` (the stand-in for another CPU), in a fresh process per
run (the variables are read when MKL and PyTorch start), alternating for ``--repeats`` rounds (this machine is shared
and noisy: read the ratio of medians). Prints each setting's median seconds and its ratio to float32 on this
machine's kernels, and, per dtype, how far the other kernels move the trained weights (max relative difference):
percents in float32 after a few dozen TopK steps (the printed digits), near 1e-13 in float64. One more float32 run
without MKL's conditional numerical reproducibility (``MKL_CBWR`` empty; `trsae.lm` turns it on) gives its cost.

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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
from refresh import read_env  # noqa: E402

CHILD = """
import json, sys, time
import numpy as np
import torch
from trsae import experiments
from trsae.saes import make_sae
from trsae.train import train_step

d, steps, dtype, out = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
sae = make_sae(experiments.temporal_specs(d, 8 * d, 32, 16)["TopK"], dtype)
opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(1)
basis = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
x_BTD = ((torch.rand(8, 128, 4 * d, generator=g, dtype=torch.float64) < 0.02).double() @ basis).to(dtype)
mask_BT = torch.ones(8, 128, dtype=torch.bool)
t0 = time.perf_counter()
for _ in range(steps):
    train_step(sae, opt, x_BTD, mask_BT, None)
dt = time.perf_counter() - t0
np.save(out, sae.W_dec.detach().double().numpy())
print(json.dumps({"seconds": dt, "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def run(env: dict[str, str], d: int, steps: int, dtype: str, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(d), str(steps), dtype, str(out)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_numerics")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    other = read_env()
    base = {k: v for k, v in os.environ.items() if k not in other}
    settings = {(dt, kern): ({**base, **other} if kern == "other" else base)
                for dt in ("float32", "float64") for kern in ("here", "other")}
    settings["float32", "cnr-off"] = {**base, "MKL_CBWR": ""}
    results = {s: [] for s in settings}
    for _ in range(a.repeats):
        for (dt, kern), env in settings.items():
            results[dt, kern].append(run(env, a.d, a.steps, dt, a.out / f"{dt}-{kern}.npy"))
    ref = statistics.median(r["seconds"] for r in results["float32", "here"])
    for (dt, kern), rs in results.items():
        med = statistics.median(r["seconds"] for r in rs)
        print(f"{dt} {kern:5s} ({rs[0]['capability']:7s}) median {med:6.2f} s  x{med / ref:4.2f}")
    for dt in ("float32", "float64"):
        w_here, w_other = (np.load(a.out / f"{dt}-{kern}.npy") for kern in ("here", "other"))
        rel = np.abs(w_here - w_other).max() / np.abs(w_here).max()
        print(f"{dt}: trained W_dec under the two kernel settings differ by {rel:.2e} (max, relative to max |W|)")


if __name__ == "__main__":
    main()
