"""SAELens on-disk format (``cfg.json`` + ``sae_weights.safetensors``): export this project's SAEs, import
SAELens SAEs for evaluation with this project's metrics.

The format needs no SAELens code to read or write; ``pip install -e '.[saelens]'`` installs the package the
round-trip test loads exports with (an optional extra: the default install stays small and CPU-only).

Mapping (SAELens architecture <- this project's sparsity part, each part's `saelens` method): ``standard`` <-
relu, ``topk`` <- topk, ``jumprelu`` <- jumprelu (per-latent thresholds), and ``jumprelu`` with one shared
threshold <- batchtopk and matryoshka (BatchTopK's inference rule: a latent fires when its pre-activation exceeds
the calibrated threshold; SAELens saves its BatchTopK SAEs the same way). The exported ``metadata`` names the
part, so that an import gives back the same part. Weights are exported in the model's raw units: the store's
normalisation scalar ``s`` (``input_scale``) is folded in as ``W_enc s``, ``W_dec / s``, ``b_dec / s``, so
SAELens's ``normalize_activations`` is "none" and codes are unchanged.

An SAE whose encoder reads earlier tokens at inference (a TRSAE, the TRSAE with the selective temporal decoder,
TFA) exports whole, as SAELens architecture `TEMPORAL_ARCHITECTURE`: ``cfg.json`` holds the project's SAE config
under ``trsae`` and the weights are the project's own; ``import trsae.saelens`` registers the class that SAELens then
loads it as (`trsae.saelens.TemporalTRSAE`, which encodes ``[batch, seq, d]`` activations with the project's code).
SAELens's own ``TemporalSAE`` (sae-lens 6.54.12, its inference class for TFA as Lubana et al. publish it) cannot
compute this project's TFA exactly: it has no encoder bias ``b_enc`` (its codes, for the attention's input and for
the novel part, are ``ReLU(x W_enc / (4 d))``), and its value and output maps are full ``F x F`` per head, where
this TFA's values are low rank (``W_v [F, d_v]``, ``W_o [d_v, F]``, `trsae.saes.tfa`) over its own head split.

``per_token=True`` exports a TRSAE's per-token dictionary only (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``) as a
TopK SAE that any SAELens install loads: a per-token tool cannot use its position embeddings or its context term,
so that encoder computes the codes of the TRSAE with window 0 and no position embeddings, not the TRSAE's own
codes; the decoder, and hence what each latent means, is the same. ``cfg.json`` says so under ``metadata``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trsae.io import atomic_path, atomic_write_json
from trsae.saes import SAE, SAEConfig, make_sae

CFG_FILE = "cfg.json"
SAELENS_VERSION = "6.54.12"
"""The SAELens release whose format ``export_saelens`` writes (``metadata.sae_lens_version``): without it SAELens
reads a ``cfg.json`` as pre-6.0 and drops ``metadata`` (hook and model names included)."""
WEIGHTS_FILE = "sae_weights.safetensors"
TEMPORAL_ARCHITECTURE = "trsae_temporal"
"""The SAELens architecture name of a whole temporal SAE (`trsae.saelens` registers it)."""
TRSAE_NOTE = ("exported from a TRSAE: per-token dictionary only; position embeddings and the context term of "
              "the encoder are dropped, so these codes are the TRSAE's at window 0 without positions")


class InterchangeError(ValueError):
    """An SAE that the SAELens format (or this project) cannot represent."""


def export_saelens(sae: SAE, directory: str | os.PathLike, model_name: str | None = None,
                   hook_name: str | None = None, per_token: bool = False) -> Path:
    """Write ``sae`` in the SAELens format into ``directory`` (atomically, weights first); returns it. An SAE whose
    encoder reads earlier tokens exports whole (`TEMPORAL_ARCHITECTURE`) unless ``per_token`` asks for a TRSAE's
    per-token dictionary alone (see the module docstring)."""
    directory = Path(directory)
    c = sae.cfg
    meta: dict = {"sae_lens_version": SAELENS_VERSION, "model_name": model_name, "hook_name": hook_name,
                  "trsae_arch": c.label}
    if sae.encoder.encodes_context and not per_token:
        cfg = {"architecture": TEMPORAL_ARCHITECTURE, "d_in": c.d_in, "d_sae": c.width, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
               "reshape_activations": "none", "trsae": c.to_dict(), "first_token_is_bos": True, "metadata": meta}
        return _write(directory, dict(sae.state_dict()), cfg)
    if sae.predicts:
        raise InterchangeError(f"a {c.label} SAE predicts part of its code from earlier tokens (TFA, or a TRSAE with "
                               "pred_k); SAELens's per-token SAEs cannot represent it, and its dictionary alone "
                               "would reconstruct without the prediction: export it whole (per_token=False)")
    s = float(c.input_scale)
    with torch.no_grad():
        tensors = {"W_enc": sae.W_enc * s, "b_enc": sae.b_enc.clone(), "W_dec": sae.W_dec / s,
                   "b_dec": sae.b_dec / s}
    cfg = {"d_in": c.d_in, "d_sae": c.width, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none"}
    meta |= {"trsae_input_scale": s, "trsae_sparsity": c.sparsity.to_dict()}
    try:
        arch_cfg, extra = sae.sparsity.saelens()
    except ValueError as e:
        raise InterchangeError(str(e)) from None
    cfg |= arch_cfg
    tensors |= extra
    if c.encoder.name == "trsae":
        meta["trsae_note"] = TRSAE_NOTE
        meta["trsae_window"] = int(getattr(c.encoder, "window", 0))
    cfg["metadata"] = meta
    return _write(directory, tensors, cfg)


def _write(directory: Path, tensors: dict[str, torch.Tensor], cfg: dict) -> Path:
    """Weights (float32), then ``cfg.json``, each atomically: a folder with a config always has its weights."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(directory / CFG_FILE, cfg)
    return directory


def import_saelens(directory: str | os.PathLike) -> SAE:
    """A SAELens-format SAE as this project's SAE, in raw units (``input_scale`` 1), for `trsae.metrics`.

    Supported: ``standard`` (-> relu), ``topk`` (-> topk) and ``jumprelu`` (-> the part named in the metadata of
    our own exports; otherwise batchtopk when one threshold is shared by all latents, else jumprelu);
    ``normalize_activations`` must be "none". A `TEMPORAL_ARCHITECTURE` export reads back as the SAE it was
    (its own input scale kept).
    """
    directory = Path(directory)
    for f in (CFG_FILE, WEIGHTS_FILE):
        if not (directory / f).exists():
            raise FileNotFoundError(f"{directory / f} not found: a SAELens SAE folder holds {CFG_FILE} and "
                                    f"{WEIGHTS_FILE}")
    cfg = json.loads((directory / CFG_FILE).read_text())
    w = load_file(str(directory / WEIGHTS_FILE))
    arch = cfg.get("architecture", "standard")
    if cfg.get("normalize_activations", "none") != "none":
        raise InterchangeError(f"normalize_activations={cfg['normalize_activations']!r} is not supported; "
                               "fold the normalisation into the weights and set it to 'none'")
    if arch == TEMPORAL_ARCHITECTURE:  # a whole temporal SAE of this project: its own config and weights
        sae = make_sae(SAEConfig.from_dict(cfg["trsae"]))
        sae.load_state_dict({k: v.float() for k, v in w.items()})
        return sae.eval()
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    meta = cfg.get("metadata") or {}
    saved = meta.get("trsae_sparsity")  # written by export_saelens: the part exactly
    if arch == "standard":
        ours = SAEConfig.build(d_in, d_sae, "relu")
    elif arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise InterchangeError("rescale_acts_by_decoder_norm=True is not supported")
        ours = SAEConfig.build(d_in, d_sae, "topk", k=int(cfg["k"]))
    elif arch == "jumprelu" and saved is not None:
        ours = SAEConfig(d_in=d_in, width=d_sae, sparsity=saved)
    elif arch == "jumprelu":
        thr = w["threshold"].float()
        shared = bool(torch.all(thr == thr[0]))  # BatchTopK's inference rule, else per-latent thresholds
        ours = SAEConfig.build(d_in, d_sae, "batchtopk" if shared else "jumprelu", k=int(meta.get("trsae_k") or 1))
    else:
        raise InterchangeError(f"SAELens architecture {arch!r} is not supported (standard, topk, jumprelu)")
    sae = make_sae(ours)
    b_enc = w["b_enc"].float()
    if not cfg.get("apply_b_dec_to_input", True):  # z = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        b_enc = b_enc + w["b_dec"].float() @ w["W_enc"].float()
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"].float())
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w["W_dec"].float())
        sae.b_dec.copy_(w["b_dec"].float())
        sae.sparsity.load_saelens_({k: v.float() for k, v in w.items()})
    return sae.eval()
