"""Each baseline's settings before and after it was aligned with its reference, and the training batches before and
after they were drawn from many documents, trained side by side on one store and read on its val split (store-only
metrics: explained variance, L0, dead latents over 100k training tokens, persistence). One seed, the cpu profile's
budget; not part of the notebooks (they train the "after" settings).

    python benchmarks/baseline_settings.py --store outputs/stores/<gemma-3-270m-L6-...> --out outputs/settings
    python benchmarks/baseline_settings.py ... --only tsae-before tsae-after     # a subset

The store is any harvested store (``python -m trsae harvest`` or a notebook's); runs are cached in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from trsae import experiments, runner
from trsae.config import TrainConfig
from trsae.saes import SAEConfig
from trsae.store import ActivationStore


def variants(d: int, k: int) -> dict[str, tuple[SAEConfig, TrainConfig]]:
    """name -> (SAE, training) of each setting compared."""
    F = 8 * d
    whole = TrainConfig(tokens=300_000, batch_size=8, crop_len=128, lr=4e-4)  # 8 whole sequences a step
    crops = dataclasses.replace(whole, batch_size=32, crop_len=32, context=16)  # 32 crops of 32 sequences

    def sae(sparsity: str, encoder: str = "token", **kw) -> SAEConfig:
        return SAEConfig.build(d, F, sparsity, encoder, k=k, **kw)

    token_l0 = {"penalty": "token", "adam_beta1": 0.9}  # SAELens's per-token quadratic penalty, Adam's default
    tsae = experiments.field_specs(d, F, k, 16)["T-SAE"]
    trsae = experiments.temporal_specs(d, F, k, 16)["TRSAE"]
    return {
        "topk whole-sequence batches": (sae("topk"), whole),
        "topk crop batches": (sae("topk"), crops),
        "batchtopk whole-sequence batches": (sae("batchtopk"), whole),
        "batchtopk crop batches": (sae("batchtopk"), crops),
        "trsae whole-sequence batches": (trsae, whole),
        "trsae crop batches": (trsae, crops),
        "jumprelu before (pooled start, thresholds at 1x, no revival, per-token penalty, Adam beta1 0.9)":
            (sae("jumprelu", init="pooled", threshold_lr_mult=1.0, pre_act_coeff=0.0, **token_l0), crops),
        "jumprelu per-latent start": (sae("jumprelu", threshold_lr_mult=1.0, pre_act_coeff=0.0, **token_l0), crops),
        "jumprelu per-latent start, thresholds at 10x": (sae("jumprelu", pre_act_coeff=0.0, **token_l0), crops),
        "jumprelu + pre-activation revival": (sae("jumprelu", **token_l0), crops),
        "jumprelu after (+ dictionary_learning's batch penalty and beta1 0)": (sae("jumprelu"), crops),
        "relu (decoder rows start at unit norm)": (SAEConfig.build(d, F, "relu"), crops),
        "relu, decoder rows start at norm 0.1 (SAELens's)": (SAEConfig.build(d, F, "relu", init_norm=0.1), crops),
        "tsae before (cosine / 0.1, adjacent pairs, weight 0.05, levels 1 : 1)":
            (tsae.replace(logits="cosine", pairs="adjacent", contrast_coeff=0.05, level_weights=None), crops),
        "tsae after (the reference's loss)": (tsae, crops),
        "tsae after, no contrastive term": (tsae.replace(contrast_coeff=0.0), crops),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="folder of the runs (cached) and results.json")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--only", nargs="+", help="names (or prefixes) of the settings to run")
    a = p.parse_args()
    store = ActivationStore(a.store)
    evaluate = runner.Evaluator(store, split="val", max_seqs=0, with_logits=False)
    out, rows = Path(a.out), {}
    for name, (cfg, tc) in variants(store.d_model, a.k).items():
        if a.only and not any(name.startswith(o) for o in a.only):
            continue
        sae, run = runner.ensure_sae(cfg, tc, store, out, progress=False)
        r = evaluate({run: sae})[run]
        rows[name] = {"ev": r["reconstruction_quality"]["explained_variance"], "l0": r["sparsity"]["l0"],
                      "dead": r["sparsity"]["dead_frac"], "persistence": r["temporal_codes"]["persistence"]}
        print(f"{name:70s} EV {rows[name]['ev']:.4f}  L0 {rows[name]['l0']:5.1f}  dead {rows[name]['dead']:.3f}  "
              f"persistence {rows[name]['persistence']:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
