"""The overhead grid: every SAE measured side by side over the width F, the window w and the context length T,
with ratios to TopK and the headline numbers of notebook 05.

In the grid every case runs once per round, in a fresh random order each round, after one warm-up step; ratios
to TopK at the same (F, T) are medians over rounds of the per-round (paired) ratios, so drifts of a shared machine
cancel. Memory is affine in T only once activations dominate (see `trsae.overhead.measure`); `summarize_grid`
reports the marginal KiB per token between the two longest contexts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from trsae import timing
from trsae.io import atomic_write_json
from trsae.overhead.flops import ARCH_NAMES, REFERENCE, WIDTHS_MULT, flops_per_token, make_config, param_count
from trsae.overhead.measure import step_fn, timed, make_batch, make_optimizer, peak_memory
from trsae.saes import SAE, SAEConfig, make_sae

WINDOWS = (1, 4, 16, 64)
CTX_LENS = (64, 128, 256, 512)


class Case(NamedTuple):
    arch: str
    width_mult: int
    window: int | None  # None for the baselines
    ctx_len: int


def _centre(values: Sequence[int], preferred: int) -> int:
    return preferred if preferred in values else sorted(values)[len(values) // 2]


def grid_centre(widths_mult: Sequence[int], windows: Sequence[int], ctx_lens: Sequence[int]) -> tuple[int, int, int]:
    """(F / d, w, T) that the one-factor-at-a-time sweeps go through: 8, 16, 128 when present, else the
    (upper) median of each list."""
    return _centre(widths_mult, 8), _centre(windows, 16), _centre(ctx_lens, 128)


def grid_cases(archs: Sequence[str] = ARCH_NAMES, widths_mult: Sequence[int] = WIDTHS_MULT,
               windows: Sequence[int] = WINDOWS, ctx_lens: Sequence[int] = CTX_LENS,
               centre: tuple[int, int, int] | None = None, full: bool = False) -> list[Case]:
    """Cases to measure. `full`: every (arch, F, T) and every w for the TRSAE. Otherwise three sweeps through
    `centre` (F0, w0, T0): F with (w0, T0), T with (F0, w0), w with (F0, T0); the baselines (no w) run at
    every (F, T) the TRSAE does, so each TRSAE case has its reference. TopK is always included."""
    archs = list(dict.fromkeys([REFERENCE, *archs]))
    for a in archs:
        if a not in ARCH_NAMES:
            raise ValueError(f"unknown arch {a!r}: expected one of {ARCH_NAMES}")
    F0, w0, T0 = centre or grid_centre(widths_mult, windows, ctx_lens)
    if full:
        trsae_cells = [(m, w, T) for m in widths_mult for T in ctx_lens for w in windows]
    else:
        trsae_cells = [(m, w0, T0) for m in widths_mult] + [(F0, w0, T) for T in ctx_lens] + \
                      [(F0, w, T0) for w in windows]
    trsae_cells = list(dict.fromkeys(trsae_cells))
    ft = list(dict.fromkeys((m, T) for m, _, T in trsae_cells))
    cases = [Case(a, m, None, T) for m, T in ft for a in archs if a != "trsae"]
    if "trsae" in archs:
        cases += [Case("trsae", m, w, T) for m, w, T in trsae_cells]
    return cases


@timing.timed("overhead")
def overhead_grid(archs: Sequence[str] = ARCH_NAMES, widths_mult: Sequence[int] = WIDTHS_MULT,
                  windows: Sequence[int] = WINDOWS, ctx_lens: Sequence[int] = CTX_LENS, d_in: int = 640,
                  k: int = 32, repeats: int = 5, batch: int = 8, centre: tuple[int, int, int] | None = None,
                  full: bool = False, memory: bool = True, device: str = "cpu", seed: int = 0,
                  trsae_kw: dict[str, Any] | None = None, threads: int | None = None,
                  log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every `grid_cases` case: train and encode time (one warm-up, then `repeats` rounds, each case
    once per round in a random order), peak memory, parameters and FLOPs. Batches are `batch` sequences of T
    tokens (so time should grow linearly with T). One model per (arch, F), shared across T and w (the
    TRSAE's window is set per case). Returns one row per case; ``*_ratio`` = median over rounds of the
    case's time / TopK's time at the same (F, T) (memory and FLOPs: plain ratios). `threads`: torch intra-op
    threads for the measurement (default: leave as is)."""
    if threads is None:
        return _grid(archs, widths_mult, windows, ctx_lens, d_in, k, repeats, batch, centre, full, memory, device,
                     seed, trsae_kw, log)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _grid(archs, widths_mult, windows, ctx_lens, d_in, k, repeats, batch, centre, full, memory, device,
                     seed, trsae_kw, log)
    finally:
        torch.set_num_threads(before)


def _grid(archs, widths_mult, windows, ctx_lens, d_in, k, repeats, batch, centre, full, memory, device, seed,
          trsae_kw, log) -> list[dict[str, Any]]:
    trsae_kw = dict(trsae_kw or {})
    cases = grid_cases(archs, widths_mult, windows, ctx_lens, centre, full)
    cuda = torch.device(device).type == "cuda"
    say = log or (lambda s: None)
    models: dict[tuple[str, int], tuple[SAE, torch.optim.Optimizer]] = {}
    batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    cfgs: dict[Case, SAEConfig] = {}
    for c in cases:
        cfg = make_config(c.arch, d_in, c.width_mult * d_in, k, c.window or 0, seed, **trsae_kw)
        cfgs[c] = cfg
        if (c.arch, c.width_mult) not in models:
            sae = make_sae(cfg.replace(window=max(windows)) if c.arch == "trsae" else cfg).to(device)
            models[(c.arch, c.width_mult)] = (sae, make_optimizer(sae))
        if c.ctx_len not in batches:
            batches[c.ctx_len] = make_batch(batch, c.ctx_len, d_in, seed, device)

    def fn(c: Case, train: bool) -> Callable[[], None]:
        sae, opt = models[(c.arch, c.width_mult)]
        if c.window is not None:
            sae.encoder.set_window(c.window)
        return step_fn(sae, opt, *batches[c.ctx_len], train)

    say(f"{len(cases)} cases, {len(models)} models; warm-up")
    for c in cases:
        for train in (True, False):
            fn(c, train)()
    times = {c: {"train": [], "encode": []} for c in cases}
    rng = random.Random(seed)
    for r in range(repeats):
        t0 = time.perf_counter()
        for c in rng.sample(cases, len(cases)):
            for train in (True, False):
                step = fn(c, train)
                times[c]["train" if train else "encode"].append(timed(step, cuda))
        say(f"round {r + 1}/{repeats}: {time.perf_counter() - t0:.1f} s")
    mem: dict[Case, dict[str, float]] = {}
    if memory:
        for c in cases:
            sae, opt = models[(c.arch, c.width_mult)]
            if c.window is not None:
                sae.encoder.set_window(c.window)
            mem[c] = {}
            for m in ("train", "encode"):
                pm = peak_memory(sae, batch, c.ctx_len, m == "train", opt, seed=seed)
                mem[c][m], mem[c][m + "_static"] = pm.peak_mib, pm.static_mib
        say("memory done")
    return _rows(cases, cfgs, times, mem, batch, torch.get_num_threads())


def _rows(cases, cfgs, times, mem, batch, threads=None) -> list[dict[str, Any]]:
    rows = []
    for c in cases:
        cfg, n = cfgs[c], batch * c.ctx_len
        ref = Case(REFERENCE, c.width_mult, None, c.ctx_len)
        row: dict[str, Any] = {**c._asdict(), "width": cfg.width, "batch": batch, "tokens": n,
                               "threads": threads,
                               "params": param_count(cfg)["total"],
                               "flops_train": flops_per_token(cfg, True, n),
                               "flops_encode": flops_per_token(cfg, False, n)}
        for mode in ("train", "encode"):
            ts, rs = times[c][mode], times[ref][mode]
            med = statistics.median(ts)
            row[f"{mode}_s"] = med
            row[f"{mode}_min_s"] = min(ts)  # stalls of a shared machine only add time: min is a floor
            row[f"{mode}_tok_s"] = n / med
            row[f"{mode}_gflop_s"] = row[f"flops_{mode}"] * n / med / 1e9
            row[f"{mode}_ratio"] = statistics.median(a / b for a, b in zip(ts, rs))
            row[f"{mode}_times"] = list(ts)
            if mem:
                row[f"peak_{mode}_mib"] = mem[c][mode]
                row[f"static_{mode}_mib"] = mem[c][mode + "_static"]  # parameters, inputs (+ Adam state)
                row[f"peak_{mode}_ratio"] = mem[c][mode] / mem[ref][mode]
        rows.append(row)
    ref_rows = {(r["width_mult"], r["ctx_len"]): r for r in rows if r["arch"] == REFERENCE}
    for r in rows:
        ref = ref_rows[(r["width_mult"], r["ctx_len"])]
        r["flops_train_ratio"] = r["flops_train"] / ref["flops_train"]
        r["flops_encode_ratio"] = r["flops_encode"] / ref["flops_encode"]
        r["params_ratio"] = r["params"] / ref["params"]
    return rows


# --------------------------------------------------------------------------------------------- summaries


def scaling_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (1 = linear)."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def _find(rows, **kw) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _paired_ratio(a: dict[str, Any], b: dict[str, Any], mode: str) -> float:
    return statistics.median(x / y for x, y in zip(a[f"{mode}_times"], b[f"{mode}_times"]))


def summarize_grid(rows: list[dict[str, Any]], centre: tuple[int, int, int]) -> dict[str, float]:
    """Headline numbers at `centre` (F0, w0, T0): time ratios to TopK per arch, TRSAE window ratio
    (largest w over w = 4, or over the smallest w; paired per round), scaling exponents of time (and of
    TRSAE memory) in T and F, and memory / FLOP / parameter ratios. Missing cases are left out."""
    F0, w0, T0 = centre
    out: dict[str, float] = {}
    at = {"width_mult": F0, "ctx_len": T0}
    for r in rows:
        if r["width_mult"] == F0 and r["ctx_len"] == T0 and r["window"] in (None, w0) and r["arch"] != REFERENCE:
            for mode in ("train", "encode"):
                out[f"{r['arch']}_{mode}_ratio"] = r[f"{mode}_ratio"]
            if "peak_train_ratio" in r:
                out[f"{r['arch']}_mem_ratio"] = r["peak_train_ratio"]
            if r["arch"] == "trsae":
                out["trsae_flops_train_ratio"] = r["flops_train_ratio"]
                out["trsae_params_ratio"] = r["params_ratio"]
    ws = sorted({r["window"] for r in rows if r["arch"] == "trsae" and r["width_mult"] == F0 and r["ctx_len"] == T0})
    if len(ws) >= 2:
        lo, hi = (4 if 4 in ws and ws[-1] != 4 else ws[0]), ws[-1]
        a, b = _find(rows, arch="trsae", window=hi, **at), _find(rows, arch="trsae", window=lo, **at)
        out.update(window_lo=lo, window_hi=hi, window_train_ratio=_paired_ratio(a, b, "train"),
                   window_encode_ratio=_paired_ratio(a, b, "encode"))
        if "peak_train_mib" in a:
            out["window_mem_ratio"] = a["peak_train_mib"] / b["peak_train_mib"]
    for arch in ARCH_NAMES:
        w = w0 if arch == "trsae" else None
        sweep_t = sorted((r["ctx_len"], r) for r in rows if r["arch"] == arch and r["width_mult"] == F0
                         and r["window"] == w)
        sweep_f = sorted((r["width_mult"], r) for r in rows if r["arch"] == arch and r["ctx_len"] == T0
                         and r["window"] == w)
        for name, sweep in (("t", sweep_t), ("f", sweep_f)):
            if len(sweep) >= 2:
                xs = [x for x, _ in sweep]
                out[f"{arch}_{name}_exponent_train"] = scaling_exponent(xs, [r["train_s"] for _, r in sweep])
                out[f"{arch}_{name}_exponent_encode"] = scaling_exponent(xs, [r["encode_s"] for _, r in sweep])
                if "peak_train_mib" in sweep[0][1]:
                    out[f"{arch}_{name}_exponent_mem"] = scaling_exponent(xs, [r["peak_train_mib"] for _, r in sweep])
        if len(sweep_t) >= 2 and "peak_train_mib" in sweep_t[0][1]:  # marginal memory of the longest contexts
            (_, a), (_, b) = sweep_t[-2:]
            d_mib = b["peak_train_mib"] - a["peak_train_mib"]
            out[f"{arch}_mem_kib_per_token"] = d_mib * 1024 / (b["tokens"] - a["tokens"])
    if "trsae_mem_kib_per_token" in out and "topk_mem_kib_per_token" in out:
        out["trsae_mem_per_token_ratio"] = out["trsae_mem_kib_per_token"] / out["topk_mem_kib_per_token"]
    return out


def save_results(path: str | os.PathLike, rows: list[dict[str, Any]], summary: dict[str, float],
                 **extra: Any) -> Path:
    """Rows, summary and anything else (environment, parameters) as JSON, atomically."""
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    obj = {**extra, "summary": {k: clean(v) for k, v in summary.items()},
           "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}
    return atomic_write_json(path, obj, indent=1, sort_keys=False)
