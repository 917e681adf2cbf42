"""This project's core metrics against SAELens's own evaluation code on gemma-3-270m layer 6 (issue #13).

A trained TopK and a trained JumpReLU SAE (run folders of the cpu profile) are exported to the SAELens format;
gemma-3-270m becomes a transformer_lens ``HookedTransformer`` with its own de-quantised weights
(transformer_lens's Gemma 3 config table and ``convert_gemma_weights``, offline), checked against the
transformers model on the first batch; then `trsae.evaluate.evaluate_saes` and SAELens's ``run_evals`` score
the same sequences of the store's test split in the same batches. Prints ours vs SAELens vs |difference|.

The alignments (special ids, CE and KL positions, ``mse`` conventions, the hook name the export loses) are
those of ``tests/test_saelens_evals.py``, whose helpers this script uses; its docstring lists them.

    python benchmarks/bench_saelens_evals.py --store ../cpurun/outputs/stores/gemma-3-270m-L6-f09d61a5c12741a1 \\
        --sae topk=../cpurun/outputs/runs/topk-904a4d42518486dc \\
        --sae jumprelu=../cpurun/outputs/runs/jumprelu-f0714bafd8860bb2 --max-seqs 16 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_saelens_evals import compare, eval_batches, format_table, hook_name, hooked_transformer  # noqa: E402

from trsae.evaluate import check_sae_matches_store  # noqa: E402
from trsae.lm import layer_acts, load_model  # noqa: E402
from trsae.saes import load_sae  # noqa: E402
from trsae.store import ActivationStore  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="a gemma-3-270m store folder")
    p.add_argument("--sae", action="append", required=True, metavar="NAME=RUN",
                   help="a run folder (or its sae/ folder); repeat for each SAE")
    p.add_argument("--split", default="test")
    p.add_argument("--max-seqs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    store = ActivationStore(a.store)
    saes = {}
    for spec in a.sae:
        name, run = spec.split("=", 1)
        sae_dir = Path(run) / "sae" if (Path(run) / "sae").is_dir() else Path(run)
        saes[name] = load_sae(sae_dir).eval()
        check_sae_matches_store(sae_dir, saes[name], store)
    model = load_model(store.manifest["model"])
    tl = hooked_transformer(model, store.ctx_len)
    layer = store.manifest["layer"]
    ids = eval_batches(store, a.split, a.max_seqs, a.batch_size)[0]
    logit_diff = float((tl(ids) - model.hf(ids).logits).abs().max())
    _, cache = tl.run_with_cache(ids, names_filter=[hook_name(layer)], stop_at_layer=layer + 1)
    h = layer_acts(model, layer, ids)
    act_diff = float((cache[hook_name(layer)] - h).abs().max())
    print(f"{model.name} as a HookedTransformer: max |logit diff| {logit_diff:.2e} on {tuple(ids.shape)} tokens; "
          f"layer {layer} output max |diff| {act_diff:.2e} (max |h| {float(h.abs().max()):.1f})")
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare(saes, store, model, tl, Path(tmp), a.split, a.max_seqs, a.batch_size)
    n_bad = 0
    for name, table in rows.items():
        print()
        print(format_table(f"{name} ({saes[name].cfg.label}, width {saes[name].cfg.width}) on {model.name} layer "
                           f"{layer}, {a.split} split, {a.max_seqs} sequences of {store.ctx_len} in batches of "
                           f"{a.batch_size}", table))
        n_bad += sum(abs(x - y) > tol for _, x, y, tol in table)
    print(f"\n{'all metrics agree' if n_bad == 0 else f'{n_bad} metrics differ'} "
          f"(sae-lens {version('sae-lens')}, transformer-lens {version('transformer-lens')}); "
          f"{time.perf_counter() - t0:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({"logit_max_abs_diff": logit_diff, "act_max_abs_diff": act_diff,
                                           "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
