"""Everything the paper takes from the notebooks: figures (one palette), tables (Markdown, LaTeX, CSV) and macros.
Pure matplotlib + the standard library: nothing here imports torch, the model or the SAEs.

    values.py   reading a results value (mean ± se), printing it rounded to its se, naming a row in words
    figures.py  comparison (points ± se), frontier, probing, top-context and overhead figures; `PALETTE`
    tables.py   results tables (mean ± se per SAE) and tables of measured rows
    macros.py   macro names and files; what each notebook writes (`MacroFile`, its prefix, its macros)
    interp.py   notebook 04's files (results JSON, tables, probing and top-context figures, macros)

Every file is written atomically (`trsae.io`), so an interrupted run never leaves half a figure, table or macro
file for the paper to pick up.
"""

from trsae.report.figures import (PALETTE, PRESERVATION_PANELS, RECONSTRUCTION_PANELS, SPARSITY_PANELS,  # noqa: F401
                                  bar_figure, color, core_figures, frontier_figure, make_bar_figure,
                                  make_frontier_figure, overhead_figure, preservation_figure, probing_figure,
                                  reconstruction_figure, save_figure, site_map_figure, sparsity_figure,
                                  top_contexts_figure)
from trsae.report.macros import (ABLATION, BASELINE, FROM_ONE, INTERP, LEAD_APART, MACRO_FILES, OVERHEAD, PREFIXES,  # noqa: F401
                                 SETUP, TEMPORAL, MacroFile, ablation_macros, baseline_macros, interp_macros, macro_name,
                                 mean_se_macros, overhead_macros, pm_text, results_macros, setup_macros,
                                 temporal_macros, write_macro_file, write_macros,
                                 length_macros, second_model_macros, field_macros, decoder_ablation_macros,
                                 contrast_macros, tuning_macros, ce_split_macros, SITE, SITE_RATIOS, site_macros)
from trsae.report.tables import (OVERHEAD_COLUMNS, OVERHEAD_STATIC_COLUMNS, TEX_COLUMNS, format_table,  # noqa: F401
                                 lr_table, results_table, text_table, write_results, write_tables)
from trsae.report.values import (PROBE_WORDS, ROW_WORDS, SINGLE_SEED_MARK, SINGLE_SEED_NOTE, Panel,  # noqa: F401
                                 budget_label, by_budget, format_mean_se, format_number, group_thousands, metric_n, metric_value, row_label,
                                 se_decimals)
from trsae.report.interp import INTERP_TABLES, TopContexts, write_interp  # noqa: F401
