"""The SAE: an encoder part and a sparsity part around one linear dictionary.

    z = encoder(x)        f = sparsity(z)        x_hat = f @ W_dec + b_dec

Parameters: ``W_dec [F, D]`` (rows unit-norm at init), ``b_dec [D]`` (zero; a trainer may set it to the data
mean), and the parts' own (``encoder.W_enc [D, F]`` = ``W_dec^T`` at init, ``encoder.b_enc [F]``, …).
An encoder may predict part of the code from earlier tokens (`EncState.pred_NF`: TFA, a TRSAE with
``pred_k``); then ``f = novel + predicted`` with the novel part from the sparsity on what the prediction leaves,
and every non-zero of f counts in L0 (`encode` returns f, `encode_parts` both parts).
`save` writes ``config.json`` (format 2: the `SAEConfig` with both parts by name) and ``sae.safetensors``;
`load_sae` also reads format 1 (one class per architecture, written before the parts existed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trsae.io import atomic_path, atomic_write_text
from trsae.saes.config import SAEConfig, part_classes

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 2


class ForwardOutput(NamedTuple):
    """What `SAE.forward` returns."""

    x_hat_BTD: Tensor
    """Reconstruction of the (scaled) input."""
    codes_BTF: Tensor
    """Sparse codes (dense tensor, zeros where inactive)."""
    loss: Tensor
    """Scalar total loss, equal to ``sum(losses.values())``."""
    losses: dict[str, Tensor]
    """Each weighted loss term by name: "mse", then the sparsity's ("l1" or "aux"), then the encoder's."""


class SAE(nn.Module):
    """Every SAE variant: `cfg.encoder` and `cfg.sparsity` name the parts (see `trsae.saes.config`)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec_FD = torch.randn(cfg.width, cfg.d_in, generator=gen)
        sparsity_class = part_classes("sparsity", cfg.sparsity.name)[1]
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        if (init_norm := sparsity_class.decoder_init_norm(cfg.sparsity)) != 1.0:
            W_dec_FD *= init_norm
        self.W_dec = nn.Parameter(W_dec_FD)
        self.encoder = part_classes("encoder", cfg.encoder.name)[1](cfg.encoder, cfg.d_in, cfg.width, W_dec_FD, gen)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.sparsity = sparsity_class(cfg.sparsity, cfg.d_in, cfg.width)

    @property
    def W_enc(self) -> Tensor:
        return self.encoder.W_enc

    @property
    def b_enc(self) -> Tensor:
        return self.encoder.b_enc

    # ----------------------------------------------------------------- public API
    def pre_acts(self, x_BTD: Tensor, pos_BT: Tensor | None = None, mask_BT: Tensor | None = None,
                 ctx_BT: Tensor | None = None) -> Tensor:
        """Pre-activations ``z_BTF`` (dense, differentiable)."""
        st = self.encoder.prepare(x_BTD, pos_BT, mask_BT, self.b_dec, self.W_dec, ctx_BT=ctx_BT)
        return self.encoder.dense(st).reshape(st.B, st.T, -1)

    def activate(self, z_BTF: Tensor, mask_BT: Tensor | None = None) -> Tensor:
        """Sparsity nonlinearity on pre-activations -> ``codes_BTF`` (batchtopk follows train/eval mode;
        masked tokens get no codes from the batch selection in training mode)."""
        B, T, F = z_BTF.shape
        mask_N = torch.ones(B * T, dtype=torch.bool, device=z_BTF.device) if mask_BT is None \
            else mask_BT.reshape(-1).bool()
        return self.sparsity.activate(z_BTF.reshape(B * T, F), mask_N).reshape(B, T, F)

    @property
    def predicts(self) -> bool:
        """True when the encoder predicts codes from earlier tokens (their sum with the novel codes is the code)."""
        return bool(getattr(self.encoder, "predicts", False))

    def encode(self, x_BTD: Tensor, pos_BT: Tensor | None = None, mask_BT: Tensor | None = None) -> Tensor:
        """Codes ``codes_BTF`` of (already scaled) inputs: novel plus predicted, where the encoder predicts."""
        novel_BTF, pred_BTF = self.encode_parts(x_BTD, pos_BT, mask_BT)
        return novel_BTF if pred_BTF is None else novel_BTF + pred_BTF

    def encode_parts(self, x_BTD: Tensor, pos_BT: Tensor | None = None,
                     mask_BT: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(novel codes from the sparsity, predicted codes or None) ``[B, T, F]`` each."""
        st, novel_NF = self.encode_state(x_BTD, pos_BT, mask_BT)
        novel_BTF = novel_NF.reshape(st.B, st.T, -1)
        return novel_BTF, None if st.pred_NF is None else st.pred_NF.reshape(st.B, st.T, -1)

    def encode_state(self, x_BTD: Tensor, pos_BT: Tensor | None = None, mask_BT: Tensor | None = None):
        """(the encoder's state of the batch, the novel codes ``[N, F]``): for readers of the encoder's parts
        (dashboards); the state's ``pred_NF`` holds the predicted codes where the encoder predicts."""
        st = self.encoder.prepare(x_BTD, pos_BT, mask_BT, self.b_dec, self.W_dec)
        return st, self.sparsity.codes(self.encoder, st).to_dense()

    def decode(self, codes_BTF: Tensor) -> Tensor:
        """Reconstruction ``x_hat_BTD = codes @ W_dec + b_dec`` (dense)."""
        return codes_BTF @ self.W_dec + self.b_dec

    def reconstruct(self, x_raw_BTD: Tensor, pos_BT: Tensor | None = None,
                    mask_BT: Tensor | None = None) -> Tensor:
        """Reconstruction of raw (unscaled) activations: scale by `input_scale`, encode, decode, unscale."""
        s = self.cfg.input_scale
        st = self.encoder.prepare(x_raw_BTD * s, pos_BT, mask_BT, self.b_dec, self.W_dec)
        x_hat_ND = self._decode_all(st, self.sparsity.codes(self.encoder, st))
        return ((x_hat_ND + self.b_dec) / s).reshape(st.B, st.T, -1)

    def _decode_all(self, st, codes) -> Tensor:
        """``(novel + predicted) @ W_dec`` (no b_dec) -> ``[N, D]``."""
        x_hat_ND = codes.decode(self.W_dec)
        return x_hat_ND if st.pred_ND is None else x_hat_ND + st.pred_ND

    def forward(self, x_BTD: Tensor, mask_BT: Tensor | None = None, pos_BT: Tensor | None = None,
                dead_F: Tensor | None = None, ctx_BT: Tensor | None = None) -> ForwardOutput:
        """Reconstruction, codes and every loss term, averaged over the tokens where `mask_BT` is True.

        `dead_F` (bool ``[F]``): latents the trainer counts as dead, for the AuxK loss of TopK-style parts. In
        training mode a sparsity may update running state (BatchTopK's threshold). `ctx_BT`: the tokens a temporal
        encoder may read as context where they differ from `mask_BT` (a training crop's left margin).
        """
        st = self.encoder.prepare(x_BTD, pos_BT, mask_BT, self.b_dec, self.W_dec, ctx_BT=ctx_BT)
        st.input_scale = self.cfg.input_scale
        N, D = st.x_ND.shape
        maskf_N = st.mask_N.to(st.x_ND.dtype)
        n_valid = maskf_N.sum().clamp_min(1.0)
        codes = self.sparsity.codes(self.encoder, st, dead_F=dead_F, update=True)
        x_hat_ND = self._decode_all(st, codes) + self.b_dec
        losses = {"mse": ((x_hat_ND - st.x_ND).pow(2).sum(1) / D * maskf_N).sum() / n_valid}
        losses.update(self.sparsity.losses(st, codes, x_hat_ND, self.W_dec, self.b_dec))
        losses.update(self.encoder.losses(st, self.W_dec, codes))
        loss = torch.stack(list(losses.values())).sum()
        codes_NF = codes.to_dense() if st.pred_NF is None else codes.to_dense() + st.pred_NF
        return ForwardOutput(x_hat_ND.reshape(st.B, st.T, D), codes_NF.reshape(st.B, st.T, -1), loss, losses)

    # ----------------------------------------------------------------- trainer helpers
    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-8) -> None:
        """Rescale W_dec rows to unit norm and every per-latent encoder term by the same norm, so that a
        ReLU SAE computes the same function (and the same norm-weighted L1) before and after."""
        norms_F = self.W_dec.norm(dim=1).clamp_min(eps)
        self.W_dec.div_(norms_F[:, None])
        self.encoder.scale_latents_(norms_F)
        self.sparsity.scale_latents_(norms_F)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from W_dec.grad the component parallel to each decoder row (call before the optimiser
        step when rows are kept at unit norm)."""
        if self.W_dec.grad is None:
            return
        unit_FD = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        grad_FD = self.W_dec.grad
        grad_FD.sub_((grad_FD * unit_FD).sum(1, keepdim=True) * unit_FD)

    def optim_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups: the base rate, then each part's own (e.g. the TRSAE context parameters
        at `temporal_lr_mult` × lr)."""
        special = [(ps, mult) for ps, mult in self.encoder.lr_groups() + self.sparsity.lr_groups() if ps]
        ids = {id(p) for ps, _ in special for p in ps}
        groups = [{"params": [p for p in self.parameters() if id(p) not in ids], "lr": lr}]
        groups += [{"params": ps, "lr": lr * mult} for ps, mult in special]
        betas = self.sparsity.adam_betas()
        return groups if betas is None else [g | {"betas": betas} for g in groups]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``sae.safetensors`` and ``config.json`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        meta = {"format": FORMAT_VERSION, "config": self.cfg.to_dict()}
        atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SAE":
        return load_sae(directory)


def make_sae(cfg: SAEConfig, dtype: torch.dtype = torch.float32) -> SAE:
    """A new SAE of ``cfg`` whose parameters are created, initialised and kept in ``dtype`` (float32, or float64
    for a float64 store: initialising in float32 and casting would carry the kernels' float32 rounding along)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return SAE(cfg)
    finally:
        torch.set_default_dtype(before)


# --------------------------------------------------------------------------------------------- loading

_V1_ENCODER_KEYS = ("W_enc", "b_enc", "window_cur", "P", "W_qkv", "W_o", "U", "gate_logit", "G")
_V1_SPARSITY = {"relu": ("l1_coeff",), "topk": ("k", "aux_k", "aux_coeff"),
                "batchtopk": ("k", "aux_k", "aux_coeff", "threshold_beta")}


def upgrade_v1(config: dict[str, Any], state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A format-1 checkpoint (``arch`` relu | topk | batchtopk | trsae, flat fields; TRSAE's mechanism in
    ``sparsity``) as a format-2 config and state dict."""
    c = dict(config)
    arch = c.pop("arch")
    sparsity = c.pop("sparsity", arch) if arch == "trsae" else arch
    sp = {"name": sparsity, **{k: c[k] for k in _V1_SPARSITY[sparsity]}}
    for k in ("l1_coeff", "k", "aux_k", "aux_coeff", "threshold_beta"):
        c.pop(k, None)
    top = {k: c.pop(k) for k in ("d_in", "width", "input_scale", "seed")}
    encoder = {"name": "trsae", **c} if arch == "trsae" else {"name": "token"}
    new_state = {}
    for k, t in state.items():
        prefix = "encoder." if k in _V1_ENCODER_KEYS else "sparsity." if k == "threshold" else ""
        new_state[prefix + k] = t
    return {**top, "sparsity": sp, "encoder": encoder}, new_state


def load_sae(directory: str | os.PathLike) -> SAE:
    """Load an SAE written by `SAE.save` (format 2, or format 1 of older checkouts); returned in eval mode."""
    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ValueError(f"no SAE at {directory} ({CONFIG_FILE} missing); name a folder written by training (a run "
                         "folder or its sae/)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not a valid SAE config (not JSON: {e}); train the SAE again") from e
    version = meta.get("format") if isinstance(meta, dict) else None
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{cfg_path}: SAE format {version!r} is not one this code reads "
                         f"(1 or {FORMAT_VERSION}); it was written by another version of trsae")
    try:
        state = load_file(str(weights))
    except Exception as e:  # missing, cut or not safetensors (safetensors' own errors name no file)
        raise ValueError(f"{weights} cannot be read ({e}); train the SAE again") from e
    try:
        config, state = upgrade_v1(meta["config"], state) if version == 1 else (meta["config"], state)
        floats = {t.dtype for t in state.values() if t.is_floating_point()}
        sae = make_sae(SAEConfig.from_dict(config), torch.float64 if floats == {torch.float64} else torch.float32)
        sae.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a field or a weight missing or mistyped
        why = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{cfg_path} is not a valid SAE config for its {WEIGHTS_FILE} ({type(e).__name__}: "
                         f"{why}); train the SAE again") from e
    return sae.eval()
