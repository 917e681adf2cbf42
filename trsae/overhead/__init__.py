"""Computational overhead of the SAEs: parameters, FLOPs, tokens/s and peak memory, side by side (notebook 05).

    flops.py    parameters and FLOPs per token from an SAE's config: the FLOP model (no timing)
    measure.py  the timing harness (the trainer's own `train_step`), peak memory (profiler, CUDA, RSS child)
    grid.py     the grid of cases over F, w and T, measured side by side; rows, ratios to TopK, `summarize_grid`

Tables, the figure and the paper macros of these rows are in `trsae.report` (`format_table`, `write_tables`,
`overhead_figure`, `overhead_macros`).
"""

from trsae.overhead.flops import (ADAM_FLOPS_PER_PARAM, ARCH_NAMES, REFERENCE, WIDTHS_MULT,  # noqa: F401
                                  config_from_dict, flop_breakdown, flop_table, flops_per_token, make_config,
                                  param_count, static_rows)
from trsae.overhead.grid import (CTX_LENS, WINDOWS, Case, grid_cases, grid_centre, overhead_grid,  # noqa: F401
                                 save_results, scaling_exponent, summarize_grid)
from trsae.overhead.measure import (PeakMemory, Timing, encode_step, machine, make_batch,  # noqa: F401
                                    make_optimizer, peak_memory, profiled_peak_bytes, step_fn, time_step, timed,
                                    train_step)
