"""Sparsity parts: what turns pre-activations ``z`` into codes ``f``, and the loss terms that come with it.

- ``relu``: ``f = ReLU(z)`` with an L1 penalty weighted by the decoder row norms (Anthropic, April 2024), so the
  penalty cannot be dodged by shrinking codes and growing decoder rows. Decoder rows are free (they start at
  `ReLUConfig.init_norm`).
- ``topk``: ``f = ReLU(TopK_k(z))`` per token (Gao et al. 2024) + the AuxK loss that revives dead latents.
- ``batchtopk``: during training the ``k * n_valid`` largest pre-activations of the whole batch (valid tokens
  only) are kept, so L0 is k on average but varies per token (Bussmann et al. 2024); in eval mode a threshold
  replaces the batch selection (an EMA of the smallest selected activation during training, which the trainer
  replaces at the end by a calibration on training data).

TopK-style parts keep unit-norm decoder rows and train sparsely: the pre-activations are computed once without
autograd, the active pairs are selected, and only their values are re-attached to the graph
(`trsae.saes.encoders.TokenEncoder.at_pairs`); decoding is an `embedding_bag` over the pairs.

Loss terms are weighted, in the order the SAE adds them after ``mse``:

- ``l1`` (relu): ``l1_coeff * mean_valid_t sum_f f_tf ||W_dec[f]||``.
- ``aux`` (topk, batchtopk): ``aux_coeff * min(n_dead / aux_k, 1) * sum ||e_hat - e||^2 / sum ||e||^2`` over valid
  tokens, where ``e = x - x_hat`` (detached) and ``e_hat`` is the decoder applied to the ``aux_k`` largest
  pre-activations among the dead latents (no ``b_dec``). Zero unless the trainer passes a non-empty `dead_F`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from trsae.saes.config import PartConfig, check_float, check_int, register_part
from trsae.saes.encoders import EncState, TokenEncoder
from trsae.saes.sparse_ops import batch_topk_pairs, decode_pairs, topk_pairs


class Codes(NamedTuple):
    """Codes of N tokens: dense (``dense_NF``) or as active pairs (``rows_M`` sorted, ``cols_M``, ``vals_M``);
    `aux` holds the AuxK pairs when the trainer asked for them."""

    dense_NF: Tensor | None
    rows_M: Tensor | None = None
    cols_M: Tensor | None = None
    vals_M: Tensor | None = None
    z_NF: Tensor | None = None
    aux: tuple | None = None

    def decode(self, W_dec_FD: Tensor) -> Tensor:
        """``codes @ W_dec`` (no b_dec) -> ``[N, D]``."""
        if self.dense_NF is not None:
            return self.dense_NF @ W_dec_FD
        return decode_pairs(self.rows_M, self.cols_M, self.vals_M, W_dec_FD, self.z_NF.shape[0])

    def to_dense(self) -> Tensor:
        if self.dense_NF is not None:
            return self.dense_NF
        return torch.zeros_like(self.z_NF).index_put_((self.rows_M, self.cols_M), self.vals_M)


class Sparsity(nn.Module):
    """Interface of a sparsity part."""

    config_class: type[PartConfig]
    unit_norm: ClassVar[bool] = False
    """The trainer keeps decoder rows at unit norm (and removes the gradient parallel to them)."""
    calibrated: ClassVar[bool] = False
    """The trainer calls `calibrate_` with training pre-activations after the last step."""
    dense_codes: ClassVar[bool] = False
    """The codes are a dense ``[N, F]`` tensor (every latent gets a gradient) rather than k selected pairs."""

    @classmethod
    def decoder_init_norm(cls, cfg: PartConfig) -> float:
        """The norm of every decoder row at initialisation (the encoder starts at the decoder's transpose): the
        config's ``init_norm`` where it has one, else 1."""
        return float(getattr(cfg, "init_norm", 1.0))

    def adam_betas(self) -> tuple[float, float] | None:
        """Adam's betas for every parameter of the SAE when this part asks for its reference's (None: Adam's
        defaults)."""
        return None

    @classmethod
    def flops(cls, cfg: Any, mode: str) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """The decoding's and the loss's FLOPs in the model of `trsae.overhead.flops` for the SAE config ``cfg``
        (mode as `trsae.saes.encoders.TokenEncoder.flops`; none in "encode"): (per token forward, per token
        backward, per step). Here: the k selected pairs decode with an ``embedding_bag`` (2kD; backward 4kD, the
        rows of dW_dec and d codes), and with `unit_norm` each step renormalises the decoder rows and removes the
        gradient parallel to them (~11FD)."""
        if mode == "encode":
            return {}, {}, {}
        D, F, k = cfg.d_in, cfg.width, cfg.sparsity.k
        train = mode == "train"
        step = {"decoder_norm": 11 * F * D} if train and cls.unit_norm else {}
        return {"decoder": 2 * k * D}, {"decoder_bwd": 4 * k * D} if train else {}, step

    def __init__(self, cfg: PartConfig, d_in: int, width: int):
        super().__init__()
        self.cfg = cfg

    def codes(self, enc: TokenEncoder, st: EncState, dead_F: Tensor | None = None, update: bool = False) -> Codes:
        """Codes of a batch (with autograd when enabled); `update`: a training step may update running state."""
        raise NotImplementedError

    def activate(self, z_NF: Tensor, mask_N: Tensor) -> Tensor:
        """The nonlinearity on given pre-activations -> dense ``codes_NF``."""
        raise NotImplementedError

    def losses(self, st: EncState, codes: Codes, x_hat_ND: Tensor, W_dec_FD: Tensor,
               b_dec_D: Tensor) -> dict[str, Tensor]:
        return {}

    def calibrate_(self, z_valid: Tensor, width: int) -> None:
        """Set inference state from flattened training pre-activations (only when `calibrated`)."""

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, learning-rate multiplier) of the parameters that do not train at the base rate."""
        return []

    def scale_latents_(self, scale_F: Tensor) -> None:
        """Per-latent state that scales with the pre-activations (called with the encoder's, by
        `SAE.normalize_decoder_`)."""

    def saelens(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The SAELens architecture this part is in SAELens's format: (cfg.json entries, extra tensors)."""
        raise ValueError(f"the {self.cfg.name!r} sparsity has no SAELens equivalent")

    @torch.no_grad()
    def load_saelens_(self, tensors: dict[str, Tensor]) -> None:
        """Read this part's state from a SAELens SAE's tensors (the inverse of `saelens`)."""


@dataclass
class ReLUConfig(PartConfig):
    """ReLU + decoder-norm-weighted L1."""

    l1_coeff: float | None = None
    """Weight of ``mean_t sum_f f_tf ||W_dec[f]||``. None -> ``5 / d_in``: Anthropic's lambda = 5 (April 2024
    update, inputs scaled to E||x||^2 = d_in, loss = squared error summed over dims) expressed in this
    module's per-dimension MSE. Sweep it to match a target L0."""

    init_norm: float = 1.0
    """Norm of the decoder rows (and so of the encoder's columns) at initialisation. SAELens's training default is
    0.1 (``decoder_init_norm``, sae-lens 6.54.12; the heuristic of Anthropic's April 2024 update). Under the tuning
    protocol (`trsae.tuning`: the L1 weight set at the base rate, then the rate) on gemma-3-270m layer 6, 300k
    tokens, 0.1 reached val FVU 0.81 at L0 33 against 0.77 at L0 31 for unit rows, so unit rows are the default."""

    def validate(self) -> None:
        if self.l1_coeff is not None:
            check_float("l1_coeff", self.l1_coeff, lo=0.0)
        check_float("init_norm", self.init_norm)
        if self.init_norm <= 0:
            raise ValueError(f"init_norm must be > 0, got {self.init_norm}")

    def resolve(self, d_in: int, width: int) -> None:
        if self.l1_coeff is None:
            self.l1_coeff = 5.0 / d_in


@register_part("sparsity", "relu", ReLUConfig)
class ReLUL1(Sparsity):
    """ReLU + decoder-norm-weighted L1 (Anthropic April 2024 style)."""

    dense_codes = True

    @classmethod
    def flops(cls, cfg, mode):
        """Dense codes times the decoder (2FD; backward 4FD), the L1 read-out ``codes @ ||W_dec||`` (2F; backward
        4F) and, once a step, the norm-weighted penalty's decoder norms (~5FD)."""
        if mode == "encode":
            return {}, {}, {}
        D, F = cfg.d_in, cfg.width
        tok = {"decoder": 2 * F * D, "l1": 2 * F}
        if mode != "train":
            return tok, {}, {}
        return tok, {"decoder_bwd": 4 * F * D, "l1_bwd": 4 * F}, {"decoder_norm": 5 * F * D}

    def codes(self, enc, st, dead_F=None, update=False) -> Codes:
        return Codes(dense_NF=enc.dense(st).relu())

    def activate(self, z_NF: Tensor, mask_N: Tensor) -> Tensor:
        return z_NF.relu()

    def saelens(self):
        return {"architecture": "standard"}, {}

    def losses(self, st, codes, x_hat_ND, W_dec_FD, b_dec_D) -> dict[str, Tensor]:
        maskf_N = st.mask_N.to(st.x_ND.dtype)
        l1_N = codes.dense_NF @ W_dec_FD.norm(dim=1)
        return {"l1": self.cfg.l1_coeff * (l1_N * maskf_N).sum() / maskf_N.sum().clamp_min(1.0)}


@dataclass
class TopKConfig(PartConfig):
    """Per-token TopK with the AuxK dead-latent loss."""

    k: int = 32
    """Active latents per token (batchtopk: per token on average over a batch)."""
    aux_k: int | None = None
    """Latents used by the dead-latent auxiliary loss. None -> ``min(d_in // 2, width)`` (Gao et al. 2024 use
    k_aux = d_in / 2)."""
    aux_coeff: float = 1 / 32
    """Weight of the auxiliary loss (Gao et al. 2024: 1/32)."""

    def validate(self) -> None:
        check_int("k", self.k, lo=1)
        if self.aux_k is not None:
            check_int("aux_k", self.aux_k, lo=1)
        check_float("aux_coeff", self.aux_coeff, lo=0.0)

    def resolve(self, d_in: int, width: int) -> None:
        if self.k > width:
            raise ValueError(f"k={self.k} must be <= width={width}")
        if self.aux_k is None:
            self.aux_k = max(1, min(d_in // 2, width))
        if self.aux_k > width:
            raise ValueError(f"aux_k={self.aux_k} must be <= width={width}")


class PairSparsity(Sparsity):
    """A TopK-style sparsity: `select` picks the active pairs from pre-activations computed without autograd;
    the AuxK loss over the latents the trainer counts as dead."""

    unit_norm = True
    cfg: TopKConfig

    def select(self, z_NF: Tensor, mask_N: Tensor) -> tuple[Tensor, Tensor]:
        """Active (row, latent) pairs, rows sorted."""
        raise NotImplementedError

    def observe(self, vals_M: Tensor) -> None:
        """Training-time hook on the selected pre-activations (running statistics)."""

    def codes(self, enc, st, dead_F=None, update=False) -> Codes:
        """Main and aux pairs share one `at_pairs` call, so the backward does one sparse product per weight."""
        with torch.no_grad():
            z_NF = enc.dense(st)
            rows_M, cols_M = self.select(z_NF, st.mask_N)
            if update and self.training:
                self.observe(z_NF[rows_M, cols_M])
            aux_pairs = self._aux_pairs(st, z_NF, dead_F) if dead_F is not None else None
        rows_all, cols_all, segs = rows_M, cols_M, (rows_M.numel(),)
        if aux_pairs is not None:
            rows_all = torch.cat([rows_M, aux_pairs[0]])
            cols_all = torch.cat([cols_M, aux_pairs[1]])
            segs = (rows_M.numel(), aux_pairs[0].numel())
        if torch.is_grad_enabled():
            vals_all = enc.at_pairs(st, z_NF, rows_all, cols_all, segs).relu()
        else:
            vals_all = z_NF[rows_all, cols_all].relu()
        aux = None
        if aux_pairs is not None:
            aux = (aux_pairs[0], aux_pairs[1], vals_all[rows_M.numel():], aux_pairs[2], aux_pairs[3])
        return Codes(None, rows_M, cols_M, vals_all[: rows_M.numel()], z_NF, aux)

    def activate(self, z_NF: Tensor, mask_N: Tensor) -> Tensor:
        rows_M, cols_M = self.select(z_NF.detach(), mask_N)
        return torch.zeros_like(z_NF).index_put_((rows_M, cols_M), z_NF[rows_M, cols_M].relu())

    def _aux_pairs(self, st: EncState, z_NF: Tensor, dead_F: Tensor):
        dead_G = dead_F.to(z_NF.device).bool().nonzero().squeeze(1)
        valid_V = st.mask_N.nonzero().squeeze(1)
        if dead_G.numel() == 0 or valid_V.numel() == 0 or self.cfg.aux_coeff == 0:
            return None
        k_aux = min(self.cfg.aux_k, dead_G.numel())
        z_VG = z_NF.index_select(1, dead_G).index_select(0, valid_V)
        cols_A = dead_G[z_VG.topk(k_aux, dim=1, sorted=False).indices].reshape(-1)
        return valid_V.repeat_interleave(k_aux), cols_A, k_aux, dead_G.numel()

    def losses(self, st, codes, x_hat_ND, W_dec_FD, b_dec_D) -> dict[str, Tensor]:
        """AuxK (Gao et al. 2024): the dead latents' top-`aux_k` codes reconstruct the residual."""
        if codes.aux is None:
            return {"aux": st.x_ND.new_zeros(())}
        rows_A, cols_A, vals_A, k_aux, n_dead = codes.aux
        n_valid = rows_A.numel() // k_aux
        e_hat_VD = decode_pairs(torch.arange(n_valid, device=rows_A.device).repeat_interleave(k_aux), cols_A, vals_A,
                                W_dec_FD, n_valid)
        e_VD = (st.x_ND - x_hat_ND).detach()[rows_A.view(-1, k_aux)[:, 0]]
        scale = min(n_dead / self.cfg.aux_k, 1.0)
        nmse = (e_hat_VD - e_VD).pow(2).sum() / e_VD.pow(2).sum().clamp_min(1e-12)
        return {"aux": self.cfg.aux_coeff * scale * nmse}


@register_part("sparsity", "topk", TopKConfig)
class TopK(PairSparsity):
    """Per-token TopK with the AuxK dead-latent loss (Gao et al. 2024)."""

    def select(self, z_NF: Tensor, mask_N: Tensor) -> tuple[Tensor, Tensor]:
        return topk_pairs(z_NF, self.cfg.k)

    def saelens(self):
        return {"architecture": "topk", "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}, {}


@dataclass
class BatchTopKConfig(TopKConfig):
    """BatchTopK with an inference threshold."""

    threshold_beta: float = 0.999
    """EMA factor of the running inference threshold (``theta <- beta theta + (1 - beta) min_active``)."""

    def validate(self) -> None:
        super().validate()
        check_float("threshold_beta", self.threshold_beta, lo=0.0)
        if self.threshold_beta >= 1.0:
            raise ValueError(f"threshold_beta={self.threshold_beta} must be in [0, 1)")


@register_part("sparsity", "batchtopk", BatchTopKConfig)
class BatchTopK(PairSparsity):
    """BatchTopK (Bussmann et al. 2024). Buffer ``threshold``: -1 until the first training batch; eval mode
    falls back to per-token TopK while it is unset."""

    calibrated = True
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, d_in: int, width: int):
        super().__init__(cfg, d_in, width)
        self.cfg_width = width
        self.register_buffer("threshold", torch.tensor(-1.0))

    def select(self, z_NF: Tensor, mask_N: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            return batch_topk_pairs(z_NF, self.cfg.k, mask_N)
        if float(self.threshold) < 0:
            return topk_pairs(z_NF, self.cfg.k)
        return (z_NF > self.threshold).nonzero(as_tuple=True)

    @torch.no_grad()
    def observe(self, vals_M: Tensor) -> None:
        positive = vals_M[vals_M > 0]
        if positive.numel() == 0:
            return
        low = positive.min()
        if float(self.threshold) < 0:
            self.threshold.copy_(low)
        else:
            beta = self.cfg.threshold_beta
            self.threshold.mul_(beta).add_((1 - beta) * low)

    def saelens(self):
        """SAELens saves BatchTopK as JumpReLU with the threshold shared by all latents (its inference rule)."""
        thr = float(self.threshold)
        if thr < 0:
            raise ValueError("this SAE has no calibrated inference threshold (threshold < 0); train it to the "
                             "end first")
        return {"architecture": "jumprelu"}, {"threshold": torch.full((self.cfg_width,), thr)}

    @torch.no_grad()
    def load_saelens_(self, tensors: dict[str, Tensor]) -> None:
        self.threshold.fill_(float(tensors["threshold"][0]))

    @torch.no_grad()
    def calibrate_(self, z_valid: Tensor, width: int) -> None:
        """The threshold at which per-token thresholding keeps the batch's top-k budget: the (k·N)-th largest of
        N tokens' pre-activations (the running EMA lags behind the encoder in a short run)."""
        n_keep = self.cfg.k * (z_valid.numel() // width)
        self.threshold.copy_(torch.topk(z_valid, n_keep).values[-1].clamp_min(0))
