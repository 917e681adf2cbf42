"""Overhead grid: train / encode tokens/s, peak memory, parameters and FLOPs of TopK, BatchTopK, ReLU-L1 and
the TRSAE, measured side by side in one run (`trsae.overhead.overhead_grid`), as ratios to TopK.

    python benchmarks/bench_overhead.py                                  # the cpu profile: d=640, k=32
    python benchmarks/bench_overhead.py --d 128 --widths 2 4 --windows 4 16 --ctx-lens 32 64 --repeats 3
    python benchmarks/bench_overhead.py --full --json grid.json --tables figures/overhead_table

By default three sweeps go through the centre (F = 8d, w = 16, T = 128): F, T (every arch) and w (TRSAE);
--full measures every combination. Each case runs once per round in a random order; times are medians over
rounds and ratios are medians of the per-round ratios to TopK at the same (F, T).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trsae import overhead as O  # noqa: E402
from trsae import report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=640, help="d_in (gemma-3-270m: 640)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--archs", nargs="+", default=list(O.ARCH_NAMES), choices=O.ARCH_NAMES)
    p.add_argument("--widths", nargs="+", type=int, default=list(O.WIDTHS_MULT), help="F as multiples of d")
    p.add_argument("--windows", nargs="+", type=int, default=list(O.WINDOWS))
    p.add_argument("--ctx-lens", nargs="+", type=int, default=list(O.CTX_LENS))
    p.add_argument("--batch", type=int, default=8, help="sequences per batch")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--full", action="store_true", help="every combination instead of three sweeps")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write rows, summary and environment here")
    p.add_argument("--tables", type=Path, help="write <stem>.md/.csv/.tex here")
    a = p.parse_args(argv)

    env = O.machine()
    print(json.dumps(env))
    centre = O.grid_centre(a.widths, a.windows, a.ctx_lens)
    t0 = time.perf_counter()
    rows = O.overhead_grid(a.archs, a.widths, a.windows, a.ctx_lens, a.d, a.k, a.repeats, a.batch, full=a.full,
                           memory=not a.no_memory, device=a.device, threads=a.threads,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    summary = O.summarize_grid(rows, centre)
    print(f"d={a.d} k={a.k} B={a.batch} repeats={a.repeats} threads={rows[0]['threads']} device={a.device} "
          f"centre (F/d, w, T)={centre} wall={wall:.0f} s")
    print(report.format_table(rows))
    for key, v in summary.items():
        print(f"{key:32s} {v:.3f}")
    if a.tables:
        report.write_tables(rows, a.tables)
    res = {"environment": env, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
           "centre": centre, "wall_s": wall, "summary": summary, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
