"""Evaluate a trained SAE on a store's held-out split: reconstruction, sparsity, and the model's behaviour
with the reconstruction spliced in at the store's layer and site (through nnsight), against zero- and
mean-ablation.

Positions, as SAEBench / SAELens (checked against sae-lens 6.54.12, ``sae_lens/evals.py``: ``get_recons_loss``,
its ``standard_replacement_hook`` and ``standard_zero_ablate_hook``; SAEBench ``sae_bench/evals/core/main.py``,
its zero-ablation hook):

- the SAE splice (`trsae.lm.splice`) replaces the site's output (`trsae.lm`) only at ordinary tokens; BOS and other
  special tokens keep their clean activation (SAELens' ``standard_replacement_hook`` with its ``mask``);
- zero- and mean-ablation replace the site's output at EVERY position, BOS and special tokens included
  (SAELens' ``standard_zero_ablate_hook`` returns ``zeros_like`` of the whole activation); mean ablation writes
  the training-split mean (`train_mean`) at every position;
- cross-entropy / KL are scored at positions that read an ordinary token and predict one
  (`trsae.metrics.next_token_targets`), the same positions for every variant;
- reconstruction metrics are in model units (the store's ``norm_scale`` undone) over ordinary tokens only, and
  read (with L0 and persistence) on more sequences than CE / KL (``recon_seqs``): they need no LM pass.

An SAE whose encoder predicts codes from earlier tokens (TFA; a TRSAE with ``pred_k``) is scored on all its codes,
novel plus predicted: ``sparsity.l0`` counts every non-zero (the matched comparison), ``sparsity.l0_novel`` the novel
codes alone (what TFA publishes as its L0) and ``sparsity.l0_predicted`` the predicted ones.

``ce_excess`` (`trsae.metrics.split`): the SAE's excess CE over the clean run summed by position bucket and by
the training-split frequency of the token read, on the CE / KL positions.

``temporal_codes`` (`trsae.metrics.persistence`): the share of a token's active codes that were active at the
previous token, the novel L0, and both by position, on the evaluated tokens.

Dead / dense latents come from a separate encode-only pass over the first ``density_tokens`` ordinary tokens
of the store's TRAIN split, in order (default 100,000; all of them if the split holds fewer): dead = never
fired on those tokens, dense = fired on more than 10% of them (``FeatureStatsAccumulator``'s
``dense_threshold`` 0.1, SAEBench's ``freq_over_10_percent``). ``sparsity.n_tokens_density`` records how many
tokens that was. L0 / L1 stay those of the evaluated split.

For SAEs whose sparsity is ``calibrated`` (BatchTopK, Matryoshka BatchTopK: a global threshold at inference,
a batch top-k in training) the evaluated batches are also encoded with the training selection, giving
``sparsity.l0_train_mode`` and ``reconstruction_quality.explained_variance_train_mode`` (pooled, as
``explained_variance``); the batch top-k depends on the batch, i.e. on ``batch_size``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import torch

from trsae.io import write_json_atomic
from trsae.lm import LoadedModel, load_model, logits_with_replacement, splice
from trsae.metrics import (CleanLogits, ExcessCEAccumulator, FeatureStatsAccumulator, LogitAccumulator,
                           PersistenceAccumulator, ReconstructionAccumulator, core_results, frequency_classes,
                           next_token_targets, token_classes)
from trsae.saes import SAE, load_sae
from trsae.store import ActivationStore
from trsae.timing import timed


def train_mean(store: ActivationStore, max_seqs: int = 256) -> torch.Tensor:
    """Mean raw activation ``[d]`` over the ordinary tokens of the first ``max_seqs`` training sequences."""
    total, n = torch.zeros(store.d_model, dtype=torch.float64), 0
    for i, b in enumerate(store.batches("train", batch_size=1, shuffle=None, epochs=1)):
        if i >= max_seqs:
            break
        rows = b.acts_BTD[b.mask_BT].double() / store.norm_scale
        total += rows.sum(0)
        n += rows.shape[0]
    return (total / max(n, 1)).to(store.dtype)


def _fill(value_D: torch.Tensor | None):
    """Zero- (``value_D`` None) or mean-ablation of the layer output at every position, BOS included (SAELens'
    ``standard_zero_ablate_hook``)."""
    def replace(h_BTD: torch.Tensor) -> torch.Tensor:
        if value_D is None:
            return torch.zeros_like(h_BTD)
        return value_D.to(device=h_BTD.device, dtype=h_BTD.dtype).expand_as(h_BTD).clone()
    return replace


def _is_calibrated(sae: SAE) -> bool:
    return bool(getattr(sae.sparsity, "calibrated", False))


@torch.no_grad()
def _train_mode_codes(sae: SAE, acts_BTD: torch.Tensor, pos_BT: torch.Tensor, mask_BT: torch.Tensor):
    """Codes with the training selection (BatchTopK's batch top-k); ``encode`` never updates running state, and
    this is checked: every buffer must be unchanged afterwards."""
    before = {k: v.clone() for k, v in sae.named_buffers()}
    sae.train()
    try:
        codes_BTF = sae.encode(acts_BTD, pos_BT=pos_BT, mask_BT=mask_BT)
    finally:
        sae.eval()
    for k, v in sae.named_buffers():
        if k in before and not torch.equal(before[k], v):
            raise RuntimeError(f"encoding in training mode changed the SAE's buffer {k}")
    return codes_BTF


@timed("density")
@torch.no_grad()
def density_stats(saes: dict[str, SAE], store: ActivationStore, density_tokens: int = 100_000,
                  batch_size: int = 32) -> dict[str, dict]:
    """Encode-only pass over the first ``density_tokens`` ordinary tokens of the store's train split, in order:
    each SAE's `FeatureStatsAccumulator.compute()` (``n_tokens`` = tokens counted, fewer if the split is
    smaller). The last batch is encoded whole and counted only up to ``density_tokens``."""
    if density_tokens <= 0:
        raise ValueError(f"density_tokens must be positive, got {density_tokens}")
    feats = {n: FeatureStatsAccumulator(s.cfg.width) for n, s in saes.items()}
    n = 0
    for b in store.batches("train", batch_size=batch_size, shuffle=None, epochs=1, drop_last=False):
        if n >= density_tokens:
            break
        count_BT = b.mask_BT.clone()
        need = density_tokens - n
        flat = count_BT.reshape(-1)
        if int(flat.sum()) > need:
            flat[torch.nonzero(flat).squeeze(1)[need:]] = False
        for name, sae in saes.items():
            codes_BTF = sae.encode(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT)
            feats[name].update(codes_BTF, count_BT)
        n += int(count_BT.sum())
    return {name: f.compute() for name, f in feats.items()}


_last_references: dict = {}


def _references(model: LoadedModel, key: tuple) -> dict:
    """The clean, zero- and mean-ablated passes of each evaluation batch (``{sequence ids: (CleanLogits, ablated
    stats)}``) for this model object and ``key`` (store, split, batch size, ablation mean), kept across calls:
    the experiments evaluate one store's SAEs in several calls (comparison, frontier, training-length curve),
    which would otherwise repeat those passes each time. Only the latest model and key are kept (the clean
    softmax is ``[tokens, vocabulary]``)."""
    if _last_references.get("model") is not model or _last_references.get("key") != key:
        _last_references.clear()
        _last_references.update(model=model, key=key, batches={})
    return _last_references["batches"]


@timed("evaluate")
@torch.no_grad()
def evaluate_saes(saes: dict[str, SAE], store: ActivationStore, model: LoadedModel | None = None,
                  split: str = "test", max_seqs: int = 64, batch_size: int = 4, mean_D: torch.Tensor | None = None,
                  with_logits: bool = True, density_tokens: int = 100_000,
                  recon_seqs: int = 0) -> dict[str, dict]:
    """Core metrics of each SAE on whole sequences of ``split`` (SAEBench-shaped): CE / KL (LM passes) on the first
    ``max_seqs``; reconstruction, sparsity and code persistence, which need no LM, on the first
    ``max(max_seqs, recon_seqs)`` (read from the store alone); dead / dense latents from `density_stats` over
    ``density_tokens`` train tokens (see the module docstring).

    The clean, zero- and mean-ablated forward passes, and their softmaxes over the vocabulary, are shared by all
    SAEs, and by later calls on the same model, store, tokens and ablation mean; each SAE adds one spliced pass
    and one log-normaliser (`trsae.metrics.CleanLogits`).
    """
    for name, sae in saes.items():
        if sae.cfg.d_in != store.d_model:
            raise ValueError(f"SAE {name} has d_in {sae.cfg.d_in}, but the store ({store.manifest['model']} "
                             f"layer {store.layer} {store.site}) has d_model {store.d_model}")
        sae.eval()
    recon = {n: ReconstructionAccumulator() for n in saes}
    recon_train = {n: ReconstructionAccumulator() for n, s in saes.items() if _is_calibrated(s)}
    logit = {n: LogitAccumulator() for n in saes}
    excess = {n: ExcessCEAccumulator() for n in saes}
    persist = {n: PersistenceAccumulator() for n in saes}
    parts = {n: torch.zeros(3, dtype=torch.float64) for n, s in saes.items() if s.predicts}  # novel, predicted, tokens
    if with_logits:
        if model is None:
            model = load_model(store.manifest["model"], dtype=store.dtype)
        if model.name != store.manifest["model"]:
            raise ValueError(f"the store was harvested from {store.manifest['model']}, not {model.name}")
        if model.dtype != store.dtype:
            raise ValueError(f"the store is read in {store.dtype} but the model runs in {model.dtype}; load it with "
                             f"load_model({model.name!r}, dtype={store.dtype})")
        if mean_D is None:
            mean_D = train_mean(store)
        class_of = frequency_classes(store.token_counts("train"))
    scale = store.norm_scale

    def logits_at_site(ids_BT, replace=None):  # the store's site replaced (clean if None); scored on the CPU
        return logits_with_replacement(model, store.layer, ids_BT, replace, site=store.site).cpu()

    if with_logits:
        refs = _references(model, (store.manifest["config_hash"], str(store.path), split, batch_size,
                                   hashlib.sha256(mean_D.double().cpu().numpy().tobytes()).hexdigest()))
    n_seqs = 0
    store_only = store.first(split, max(max_seqs, recon_seqs), batch_size, skip=max_seqs)
    for b in itertools.chain(store.first(split, max_seqs, batch_size), store_only):
        lm_pass = with_logits and n_seqs < max_seqs
        if lm_pass:
            seqs = tuple(b.seq_B.tolist())
            if seqs not in refs:
                targets_BT, tmask_BT = next_token_targets(b.ids_BT, b.mask_BT)
                ref = CleanLogits(logits_at_site(b.ids_BT), targets_BT, tmask_BT)
                refs[seqs] = ref, {v: ref.stats(logits_at_site(b.ids_BT, _fill(fill)), v)
                                   for v, fill in (("zero", None), ("mean", mean_D))}
            ref, ablated = refs[seqs]
        for name, sae in saes.items():
            if sae.predicts:
                novel_BTF, pred_BTF = sae.encode_parts(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT)
                codes_BTF = novel_BTF + pred_BTF
                parts[name] += torch.stack([(novel_BTF[b.mask_BT] != 0).sum(), (pred_BTF[b.mask_BT] != 0).sum(),
                                            b.mask_BT.sum()]).double()
            else:
                codes_BTF = sae.encode(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT)
            x_hat_BTD = sae.decode(codes_BTF)
            recon[name].update(b.acts_BTD / scale, x_hat_BTD / scale, codes_BTF, b.mask_BT)  # model units
            persist[name].update(codes_BTF, b.mask_BT, b.pos_BT)
            if name in recon_train:
                codes_tr_BTF = _train_mode_codes(sae, b.acts_BTD, b.pos_BT, b.mask_BT)
                recon_train[name].update(b.acts_BTD / scale, sae.decode(codes_tr_BTF) / scale, codes_tr_BTF,
                                         b.mask_BT)
            if lm_pass:
                spliced = logits_at_site(b.ids_BT, splice(sae, b.mask_BT, b.pos_BT))
                n, ce, kl, ce_N = ref.stats(spliced, name, per_position=True)
                logit[name].add_clean(ref)
                logit[name].add("sae", (n, ce, kl))
                excess[name].update(ce_N, ref.ce_clean_N, b.pos_BT.reshape(-1)[ref.rows],
                                    token_classes(class_of, b.ids_BT.reshape(-1)[ref.rows]))
                logit[name].add("zero", ablated["zero"])
                logit[name].add("mean", ablated["mean"])
                del spliced
        n_seqs += len(b.seq_B)
    dens = density_stats(saes, store, density_tokens, batch_size=max(batch_size, 32))
    out = {}
    for name, sae in saes.items():
        r = recon[name].compute()
        token_stats = {"n_seqs": min(n_seqs, max_seqs), "n_seqs_recon": n_seqs, "n_tokens_eval": r["n_tokens"],
                       "split": split}
        cfg = {"sae": sae.cfg.to_dict(),
               "store": {**{k: store.manifest[k] for k in ("model", "layer", "data", "ctx_len", "config_hash")},
                         "site": store.site}}
        token_stats["n_tokens_density"] = dens[name]["n_tokens"]
        train_mode = None
        if name in recon_train:
            rt = recon_train[name].compute()
            train_mode = {"l0": rt["l0"], "explained_variance": rt["explained_variance"]}
        out[name] = core_results(r, logit[name].compute() if with_logits else None, dens[name],
                                 config=cfg, token_stats=token_stats, train_mode=train_mode)
        out[name]["temporal_codes"] = persist[name].compute()
        if with_logits:
            out[name]["ce_excess"] = excess[name].compute()
        if name in parts:
            n_novel, n_pred, n_tok = parts[name].tolist()
            out[name]["sparsity"].update(l0_novel=n_novel / max(n_tok, 1.0), l0_predicted=n_pred / max(n_tok, 1.0))
    return out


@torch.no_grad()
def split_fvu(saes: dict[str, SAE], store: ActivationStore, split: str, max_seqs: int,
              batch_size: int = 4) -> dict[str, float]:
    """Pooled FVU (1 − explained variance, as `evaluate_saes` reads it, in model units) of each SAE on the ordinary
    tokens of the first ``max_seqs`` sequences of ``split``, from the store alone (every code, predicted ones
    included). The training-length curve reads it on the train split, where epochs would show overfitting."""
    recon = {n: ReconstructionAccumulator() for n in saes}
    scale = store.norm_scale
    for sae in saes.values():
        sae.eval()
    for b in store.first(split, max_seqs, batch_size):
        for name, sae in saes.items():
            x_hat_BTD = sae.decode(sae.encode(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT))
            recon[name].update(b.acts_BTD / scale, x_hat_BTD / scale, None, b.mask_BT)
    return {n: 1.0 - r.compute()["explained_variance"] for n, r in recon.items()}


def evaluate_sae(sae: SAE, store: ActivationStore, model: LoadedModel | None = None, **kw) -> dict:
    """`evaluate_saes` for one SAE."""
    return evaluate_saes({"sae": sae}, store, model, **kw)["sae"]


def check_sae_matches_store(sae_dir: Path, sae, store: ActivationStore) -> None:
    """Refuse an SAE trained for another model, layer, site or width than ``store`` holds (its run folder's
    ``run.json`` names the store it was trained on; a bare SAE folder is checked by width only)."""
    here = f"{store.manifest['model']} layer {store.layer} {store.site}"
    if sae.cfg.d_in != store.d_model:
        raise ValueError(f"the SAE at {sae_dir} reads d={sae.cfg.d_in} activations but the store at {store.path} "
                         f"holds d={store.d_model} ({here}); evaluate it on a store of the model, layer and site it "
                         "was trained on")
    run = sae_dir.parent / "run.json"
    if run.exists():
        try:
            trained = json.loads(run.read_text())["store"]
            was = f"{trained['model']} layer {trained['layer']} {trained.get('site', 'resid_post')}"
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{run} is not a valid run record ({type(e).__name__}: {e}); evaluate the SAE folder "
                             f"{sae_dir} itself (--sae {sae_dir}) or train it again") from None
        if was != here:
            raise ValueError(f"the SAE at {sae_dir} was trained on {was} but the store at {store.path} holds "
                             f"{here}; evaluate it on a store of that model, layer and site")


def eval_from_args(a) -> None:
    store = ActivationStore(a.store)
    sae_dir = Path(a.sae) / "sae" if (Path(a.sae) / "sae").is_dir() else Path(a.sae)
    sae = load_sae(sae_dir)
    check_sae_matches_store(sae_dir, sae, store)
    res = evaluate_sae(sae, store, split=a.split, max_seqs=a.max_seqs, density_tokens=a.density_tokens,
                       recon_seqs=a.recon_seqs)
    if a.out:
        write_json_atomic(a.out, res)
        print(f"wrote {a.out}")
    else:
        print(json.dumps(res, indent=1, default=str))
