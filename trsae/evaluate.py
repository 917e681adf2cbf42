"""Evaluate a trained SAE on a store's held-out split: reconstruction, sparsity, and the model's behaviour
with the reconstruction spliced in at the layer (through nnsight), against zero- and mean-ablation.

Splicing (`trsae.lm.splice`) replaces the layer output only at ordinary tokens; BOS and other special tokens
keep their clean activation in every variant (SAE, zero, mean), and cross-entropy / KL are scored at positions
that read an ordinary token and predict one (`trsae.metrics.next_token_targets`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trsae.io import write_json_atomic
from trsae.lm import LoadedModel, load_model, logits_with_replacement, splice
from trsae.metrics import (CleanLogits, FeatureStatsAccumulator, LogitAccumulator, ReconstructionAccumulator,
                           core_results, next_token_targets)
from trsae.saes import SAE, load_sae
from trsae.store import ActivationStore


def train_mean(store: ActivationStore, max_seqs: int = 256) -> torch.Tensor:
    """Mean raw activation ``[d]`` over the ordinary tokens of the first ``max_seqs`` training sequences."""
    total, n = torch.zeros(store.d_model, dtype=torch.float64), 0
    for i, b in enumerate(store.batches("train", batch_size=1, shuffle=None, epochs=1)):
        if i >= max_seqs:
            break
        rows = b.acts_BTD[b.mask_BT].double() / store.norm_scale
        total += rows.sum(0)
        n += rows.shape[0]
    return (total / max(n, 1)).float()


def _fill(value_D: torch.Tensor | None, mask_BT: torch.Tensor):
    def replace(h_BTD: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(h_BTD) if value_D is None else value_D.to(h_BTD.dtype).expand_as(h_BTD)
        return torch.where(mask_BT[..., None], v, h_BTD)
    return replace


@torch.no_grad()
def evaluate_saes(saes: dict[str, SAE], store: ActivationStore, model: LoadedModel | None = None,
                  split: str = "test", max_seqs: int = 64, batch_size: int = 4, mean_D: torch.Tensor | None = None,
                  with_logits: bool = True) -> dict[str, dict]:
    """Core metrics of each SAE on the first ``max_seqs`` whole sequences of ``split`` (SAEBench-shaped).

    The clean, zero- and mean-ablated forward passes, and their softmaxes over the vocabulary, are shared by all
    SAEs; each SAE adds one spliced pass and one log-normaliser (`trsae.metrics.CleanLogits`).
    """
    for name, sae in saes.items():
        if sae.cfg.d_in != store.d_model:
            raise ValueError(f"SAE {name} has d_in {sae.cfg.d_in}, but the store ({store.manifest['model']} "
                             f"layer {store.manifest['layer']}) has d_model {store.d_model}")
        sae.eval()
    recon = {n: ReconstructionAccumulator() for n in saes}
    feats = {n: FeatureStatsAccumulator(s.cfg.width) for n, s in saes.items()}
    logit = {n: LogitAccumulator() for n in saes}
    if with_logits:
        if model is None:
            model = load_model(store.manifest["model"])
        if model.name != store.manifest["model"]:
            raise ValueError(f"the store was harvested from {store.manifest['model']}, not {model.name}")
        if mean_D is None:
            mean_D = train_mean(store)
    layer, scale = store.manifest["layer"], store.norm_scale
    n_seqs = 0
    for b in store.batches(split, batch_size=batch_size, shuffle=None, epochs=1, drop_last=False):
        if n_seqs >= max_seqs:
            break
        if with_logits:
            targets_BT, tmask_BT = next_token_targets(b.ids_BT, b.mask_BT)
            ref = CleanLogits(logits_with_replacement(model, layer, b.ids_BT), targets_BT, tmask_BT)
            ablated = {v: ref.stats(logits_with_replacement(model, layer, b.ids_BT, _fill(fill, b.mask_BT)), v)
                       for v, fill in (("zero", None), ("mean", mean_D))}
        for name, sae in saes.items():
            codes_BTF = sae.encode(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT)
            x_hat_BTD = sae.decode(codes_BTF)
            recon[name].update(b.acts_BTD / scale, x_hat_BTD / scale, codes_BTF, b.mask_BT)  # model units
            feats[name].update(codes_BTF, b.mask_BT)
            if with_logits:
                spliced = logits_with_replacement(model, layer, b.ids_BT, splice(sae, b.mask_BT, b.pos_BT))
                logit[name].add_clean(ref)
                logit[name].add("sae", ref.stats(spliced, name))
                logit[name].add("zero", ablated["zero"])
                logit[name].add("mean", ablated["mean"])
                del spliced
        n_seqs += len(b.seq_B)
    out = {}
    for name, sae in saes.items():
        r = recon[name].compute()
        token_stats = {"n_seqs": n_seqs, "n_tokens_eval": r["n_tokens"], "split": split}
        cfg = {"sae": sae.cfg.to_dict(),
               "store": {k: store.manifest[k] for k in ("model", "layer", "data", "ctx_len", "config_hash")}}
        out[name] = core_results(r, logit[name].compute() if with_logits else None, feats[name].compute(),
                                 config=cfg, token_stats=token_stats)
    return out


def evaluate_sae(sae: SAE, store: ActivationStore, model: LoadedModel | None = None, **kw) -> dict:
    """`evaluate_saes` for one SAE."""
    return evaluate_saes({"sae": sae}, store, model, **kw)["sae"]


def check_sae_matches_store(sae_dir: Path, sae, store: ActivationStore) -> None:
    """Refuse an SAE trained for another model, layer or width than ``store`` holds (its run folder's
    ``run.json`` names the store it was trained on; a bare SAE folder is checked by width only)."""
    if sae.cfg.d_in != store.d_model:
        raise ValueError(f"the SAE at {sae_dir} reads d={sae.cfg.d_in} activations but the store at {store.path} "
                         f"holds d={store.d_model} ({store.manifest['model']} layer {store.manifest['layer']}); "
                         "evaluate it on a store of the model and layer it was trained on")
    run = sae_dir.parent / "run.json"
    if run.exists():
        trained = json.loads(run.read_text())["store"]
        here = (store.manifest["model"], store.manifest["layer"])
        if (trained["model"], trained["layer"]) != here:
            raise ValueError(f"the SAE at {sae_dir} was trained on {trained['model']} layer {trained['layer']} "
                             f"but the store at {store.path} holds {here[0]} layer {here[1]}; evaluate it on a "
                             "store of that model and layer")


def eval_from_args(a) -> None:
    store = ActivationStore(a.store)
    sae_dir = Path(a.sae) / "sae" if (Path(a.sae) / "sae").is_dir() else Path(a.sae)
    sae = load_sae(sae_dir)
    check_sae_matches_store(sae_dir, sae, store)
    res = evaluate_sae(sae, store, split=a.split, max_seqs=a.max_seqs)
    if a.out:
        write_json_atomic(a.out, res)
        print(f"wrote {a.out}")
    else:
        print(json.dumps(res, indent=1, default=str))
