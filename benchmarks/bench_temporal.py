"""Overhead of the TRSAE over the matched baseline, measured side by side in one run.

    python benchmarks/bench_temporal.py                       # d=640, F=5120, k=32, B x T = 16 x 128
    python benchmarks/bench_temporal.py --d 64 --width 512 --repeats 3 --json out.json

Training step = forward + backward + remove_parallel_grad_ + Adam step + normalize_decoder_ (what a trainer
does), on a fixed random batch with BOS masked. Encode = eval-mode `encode` under no_grad. Every variant runs
once per round, rounds are interleaved and the median over rounds is reported, so slow drifts of the
machine hit all variants alike. Peak memory is measured in a fresh subprocess per variant: peak RSS
(VmHWM) minus the RSS after the input batch is built, i.e. parameters + optimiser state + activations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trsae.overhead import encode_step as encode, train_step  # noqa: E402
from trsae.saes import SAEConfig, make_sae  # noqa: E402

WINDOWS = (4, 16, 64)


def make(name: str, a: argparse.Namespace):
    """'base' or 'w<N>' -> (sae, optimiser)."""
    common = {} if a.sparsity == "relu" else {"k": a.k}
    if name == "base":
        cfg = SAEConfig.build(a.d, a.width, a.sparsity, **common)
    else:
        cfg = SAEConfig.build(a.d, a.width, a.sparsity, "trsae", window=int(name[1:]), d_k=a.d_k, d_v=a.d_v,
                              d_ctx=a.d_ctx, per_token_gates=a.per_token_gates, **common)
    sae = make_sae(cfg)
    return sae, torch.optim.Adam(sae.parameters(), lr=1e-4)


def batch(a: argparse.Namespace):
    gen = torch.Generator().manual_seed(0)
    x_BTD = torch.randn(a.batch, a.seq, a.d, generator=gen)
    mask_BT = torch.ones(a.batch, a.seq, dtype=torch.bool)
    mask_BT[:, 0] = False  # BOS
    return x_BTD, mask_BT


def proc_status_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak) of this process. VmHWM, unlike ru_maxrss, is not inherited from
    the parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_memory_child(a: argparse.Namespace) -> None:
    """Subprocess body: print the peak RSS increase (MiB) of building `a.mem_variant` and running steps."""
    x_BTD, mask_BT = batch(a)
    before = proc_status_kib("VmRSS")
    sae, opt = make(a.mem_variant, a)
    for _ in range(2):
        if a.mem_mode == "train":
            train_step(sae, opt, x_BTD, mask_BT)
        else:
            encode(sae.eval(), x_BTD, mask_BT)
    print(json.dumps({"peak_mib": (proc_status_kib("VmHWM") - before) / 1024}))


def peak_memory(variant: str, mode: str, argv: list[str]) -> float:
    cmd = [sys.executable, __file__, *argv, "--mem-variant", variant, "--mem-mode", mode]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--width", type=int, default=5120)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--sparsity", default="topk", choices=["topk", "batchtopk", "relu"])
    p.add_argument("--window", type=int, default=16, help="TRSAE window compared with the baseline")
    p.add_argument("--d-k", type=int, default=16)
    p.add_argument("--d-v", type=int, default=64)
    p.add_argument("--d-ctx", type=int, default=64)
    p.add_argument("--per-token-gates", action="store_true")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--mem-variant", help=argparse.SUPPRESS)
    p.add_argument("--mem-mode", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.mem_variant:
        peak_memory_child(a)
        return {}
    child_argv = [s for s in argv if not s.startswith("--json")]
    if a.json:
        child_argv = [s for s in child_argv if s != str(a.json)]

    tokens = a.batch * a.seq
    x_BTD, mask_BT = batch(a)
    trsae_name = f"w{a.window}"
    names = ["base", *dict.fromkeys([trsae_name, *(f"w{w}" for w in WINDOWS)])]
    models = {n: make(n, a) for n in names}
    for sae, opt in models.values():  # warm-up (allocator, threads)
        train_step(sae, opt, x_BTD, mask_BT)
    train_s = {n: [] for n in names}
    enc_s = {n: [] for n in ("base", trsae_name)}
    for _ in range(a.repeats):
        for n, (sae, opt) in models.items():
            train_s[n].append(timed(train_step, sae.train(), opt, x_BTD, mask_BT))
        for n in enc_s:
            enc_s[n].append(timed(encode, models[n][0].eval(), x_BTD, mask_BT))
    med_train = {n: statistics.median(v) for n, v in train_s.items()}
    med_enc = {n: statistics.median(v) for n, v in enc_s.items()}
    mem = {}
    if not a.no_memory:
        for n in ("base", trsae_name):
            mem[n] = {m: peak_memory(n, m, child_argv) for m in ("train", "encode")}

    res = {
        "config": {k: v for k, v in vars(a).items() if k not in ("json", "mem_variant", "mem_mode")},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "n_params": {n: models[n][0].n_params() for n in ("base", trsae_name)},
        "train_tok_s": {n: tokens / s for n, s in med_train.items()},
        "encode_tok_s": {n: tokens / s for n, s in med_enc.items()},
        "peak_mib": mem,
        "ratio_train_time_trsae_over_base": med_train[trsae_name] / med_train["base"],
        "ratio_encode_time_trsae_over_base": med_enc[trsae_name] / med_enc["base"],
        "ratio_train_time_w_over_w4": {f"w{w}": med_train[f"w{w}"] / med_train["w4"] for w in WINDOWS},
    }
    if mem:
        res["ratio_peak_mem_trsae_over_base"] = {m: mem[trsae_name][m] / mem["base"][m] for m in ("train", "encode")}
    report(res, a, trsae_name)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


def report(res: dict, a: argparse.Namespace, trsae_name: str) -> None:
    print(f"d={a.d} F={a.width} k={a.k} BxT={a.batch}x{a.seq} sparsity={a.sparsity} "
          f"d_k={a.d_k} d_v={a.d_v} d_ctx={a.d_ctx} per_token_gates={a.per_token_gates} "
          f"threads={res['threads']} repeats={a.repeats} (median)")
    print(f"{'':24s}{'baseline':>12s}{'TRSAE ' + trsae_name:>14s}{'ratio':>8s}")
    for label, key, fmt in (("train tok/s", "train_tok_s", ".0f"), ("encode tok/s", "encode_tok_s", ".0f")):
        b, t = res[key]["base"], res[key][trsae_name]
        print(f"{label:24s}{b:12{fmt}}{t:14{fmt}}{b / t:8.2f}  (time ratio)")
    for mode in ("train", "encode") if res["peak_mib"] else ():
        b, t = res["peak_mib"]["base"][mode], res["peak_mib"][trsae_name][mode]
        print(f"{'peak MiB ' + mode:24s}{b:12.0f}{t:14.0f}{t / b:8.2f}")
    b, t = res["n_params"]["base"], res["n_params"][trsae_name]
    print(f"{'parameters':24s}{b:12d}{t:14d}{t / b:8.2f}")
    print("TRSAE train time vs w=4: " + "  ".join(f"{k}: {v:.2f}" for k, v in
                                                  res["ratio_train_time_w_over_w4"].items()))


if __name__ == "__main__":
    main()
