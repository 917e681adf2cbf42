"""Temporal SAEs inside SAELens: ``import trsae.saelens`` registers the architecture `ARCHITECTURE` with SAELens's
registry (``sae_lens.registry.register_sae_class``), so that ``sae_lens.SAE.load_from_disk(folder)`` loads what
`trsae.interchange.export_saelens` writes for an SAE whose encoder reads earlier tokens (a TRSAE, a TRSAE with the
selective temporal decoder, TFA).

The loaded `TemporalTRSAE` is a SAELens ``SAE`` holding this project's SAE unchanged (``.trsae``): ``encode`` takes
raw activations ``[batch, seq, d]`` (SAELens's own shape for a hook's output; any leading dims before ``seq``),
gives every token the position of its index along ``seq`` and, with ``first_token_is_bos`` (the default, as
SAELens and this project's stores prepend BOS), treats position 0 as a special token that no other token reads as
context, exactly as this project's evaluation treats BOS. Codes are the project's (novel plus predicted codes where
the encoder predicts), so SAELens's ``run_evals`` and ``HookedSAETransformer`` score the SAE as this project's
evaluation does. A flat ``[tokens, d]`` batch has no order and is refused: the context is the point.

Needs the ``saelens`` extra (``pip install -e '.[saelens]'``); checked against sae-lens 6.54.12
(``sae_lens/saes/sae.py``: ``SAE``, ``SAEConfig``, ``load_from_disk``; ``sae_lens/registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens import SAE as SAELensSAE
from sae_lens import SAEConfig as SAELensConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class

from trsae.interchange import TEMPORAL_ARCHITECTURE as ARCHITECTURE
from trsae.saes import SAE, SAEConfig, make_sae

PREFIX = "trsae."
"""Where the project's SAE sits in the SAELens module (its state-dict keys carry this prefix in memory, not on disk)."""


@dataclass
class TemporalTRSAEConfig(SAELensConfig):
    """SAELens's config plus the project's own SAE config (``trsae``: `trsae.saes.SAEConfig.to_dict`)."""

    trsae: dict[str, Any] = field(default_factory=dict)
    first_token_is_bos: bool = True

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class TemporalTRSAE(SAELensSAE[TemporalTRSAEConfig]):
    """A SAELens SAE that encodes with one of this project's context-reading SAEs (see the module docstring)."""

    trsae: SAE

    def initialize_weights(self) -> None:
        if not self.cfg.trsae:
            raise ValueError(f"a {ARCHITECTURE!r} config needs the project's SAE config under 'trsae'; export the "
                             "SAE with trsae.interchange.export_saelens")
        self.trsae = make_sae(SAEConfig.from_dict(self.cfg.trsae), self.dtype)

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802  (SAELens's name)
        return self.trsae.W_dec

    @property
    def b_dec(self) -> torch.Tensor:
        return self.trsae.b_dec

    @property
    def W_enc(self) -> torch.Tensor:  # noqa: N802
        return self.trsae.W_enc

    def _positions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() < 3:
            raise ValueError(f"a {self.trsae.cfg.label} SAE reads the tokens before each one: pass activations as "
                             f"[batch, seq, d_in], not {tuple(x.shape)}")
        x_BTD = x.reshape(-1, *x.shape[-2:])
        B, T, _ = x_BTD.shape
        pos_BT = torch.arange(T, device=x.device).expand(B, T)
        mask_BT = pos_BT > 0 if self.cfg.first_token_is_bos else torch.ones_like(pos_BT, dtype=torch.bool)
        return x_BTD, pos_BT, mask_BT

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of raw activations ``[..., seq, d_in]``: the project's `SAE.encode` of the scaled inputs."""
        x = self.hook_sae_input(x.to(self.dtype))
        x_BTD, pos_BT, mask_BT = self._positions(x)
        codes_BTF = self.trsae.encode(x_BTD * self.trsae.cfg.input_scale, pos_BT=pos_BT, mask_BT=mask_BT)
        return self.hook_sae_acts_post(codes_BTF.reshape(*x.shape[:-1], -1))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Raw-unit reconstruction of codes (the project's `SAE.decode`, unscaled)."""
        x_hat = self.trsae.decode(feature_acts) / self.trsae.cfg.input_scale
        return self.hook_sae_recons(x_hat)

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        for key in list(state_dict):
            state_dict[PREFIX + key] = state_dict.pop(key)

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        for key in list(state_dict):
            if key.startswith(PREFIX):
                state_dict[key[len(PREFIX):]] = state_dict.pop(key)

    def fold_W_dec_norm(self) -> None:  # noqa: N802
        raise NotImplementedError(f"folding decoder norms into a {ARCHITECTURE} SAE's encoder is not supported")


if ARCHITECTURE not in SAE_CLASS_REGISTRY:  # a second import (or a reload) registers nothing twice
    register_sae_class(ARCHITECTURE, TemporalTRSAE, TemporalTRSAEConfig)
