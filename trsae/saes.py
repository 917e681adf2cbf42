"""Sparse autoencoders over `[B, T, d]` activations: one interface, three per-token baselines.

Pure torch (+ safetensors, json): this module never imports the model, data or store layers.

Shapes are in variable names: B batch, T time, D = d_in, F = width (latents), N = B*T flattened tokens,
M = number of (token, latent) pairs that are active. `mask_BT` is a bool mask, False on BOS / special tokens,
which never enter a loss or a statistic; `pos_BT` holds absolute positions (per-token SAEs ignore it).

Architectures (`SAEConfig.arch`):

- ``relu``: ``f = ReLU(z)`` with an L1 penalty weighted by the decoder row norms (Anthropic, April 2024), so the
  penalty cannot be dodged by shrinking codes and growing decoder rows.
- ``topk``: ``f = ReLU(TopK_k(z))`` per token (Gao et al. 2024) + the AuxK loss that revives dead latents.
- ``batchtopk``: during training the ``k * n_valid`` largest pre-activations of the whole batch (valid tokens
  only) are kept, so L0 is k on average but varies per token (Bussmann et al. 2024); a running threshold
  (EMA of the smallest selected positive activation) replaces the batch selection in eval mode.

with ``z = W_enc^T (x - b_dec) + b_enc`` (implemented as ``x @ W_enc + (b_enc - b_dec @ W_enc)``, which is the
same function but spares the backward pass a full ``[N, F] x [F, D]`` product) and ``x_hat = f @ W_dec + b_dec``.

TopK-style training is sparse where it pays: the pre-activations are computed once without autograd, the
active pairs are selected, and their values are re-attached to the graph by `_PairPreacts`, whose backward
is a sparse product over the active pairs (no dense ``[N, F]`` gradient, no ``dL/dx``); the decoder runs as
an `embedding_bag` over the active pairs instead of a dense ``[N, F] x [F, D]`` product. The result is the same function and the same
gradients as autograd through a dense TopK (tested in tests/test_saes.py).

Loss terms (`ForwardOutput.losses`) are stored already weighted, so ``loss == sum(losses.values())``:

- ``mse``: mean over valid tokens of ``||x - x_hat||^2 / d_in``. With inputs normalised so that
  ``E||x||^2 = d_in`` this is about the fraction of unexplained (uncentred) variance.
- ``l1`` (relu): ``l1_coeff * mean_valid_t sum_f f_tf ||W_dec[f]||``.
- ``aux`` (topk, batchtopk): ``aux_coeff * min(n_dead / aux_k, 1) * sum ||e_hat - e||^2 / sum ||e||^2`` over valid
  tokens, where ``e = x - x_hat`` (detached) and ``e_hat`` is the decoder applied to the ``aux_k`` largest
  pre-activations among the dead latents (no ``b_dec``). Zero unless the trainer passes a non-empty `dead_F`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as tnf
from safetensors.torch import load_file, save_file

from trsae.io import atomic_path
from torch import Tensor, nn

ARCHS = ("relu", "topk", "batchtopk")
"""Per-token sparsity mechanisms; also the values of `TRSAEConfig.sparsity`."""

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------- config


@dataclass
class SAEConfig:
    """What an SAE is. Saved inside every checkpoint (`config.json`), checked on construction."""

    arch: str
    """Sparsity mechanism: "relu" (ReLU + decoder-norm-weighted L1), "topk" or "batchtopk"."""
    d_in: int
    """Width D of the input activations."""
    width: int
    """Number of latents F."""
    k: int = 32
    """Active latents per token (topk) or per token on average over a batch (batchtopk)."""
    l1_coeff: float | None = None
    """relu only: weight of ``mean_t sum_f f_tf ||W_dec[f]||``. None -> ``5 / d_in``: Anthropic's lambda = 5
    (April 2024 update, inputs scaled to E||x||^2 = d_in, loss = squared error summed over dims) expressed
    in this module's per-dimension MSE. Sweep it to match a target L0."""
    aux_k: int | None = None
    """topk/batchtopk: latents used by the dead-latent auxiliary loss. None -> ``min(d_in // 2, width)``
    (Gao et al. 2024 use k_aux = d_in / 2)."""
    aux_coeff: float = 1 / 32
    """topk/batchtopk: weight of the auxiliary loss (Gao et al. 2024: 1/32)."""
    threshold_beta: float = 0.999
    """batchtopk: EMA factor of the inference threshold (``theta <- beta theta + (1 - beta) min_active``)."""
    input_scale: float = 1.0
    """Scalar s such that ``E||s x||^2 = d_in`` on the training split. Inputs to forward/encode are already
    scaled; `SAE.reconstruct` takes raw activations and applies and undoes s."""
    seed: int = 0
    """Seed of the parameter initialisation."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def mechanism(self) -> str:
        """The sparsity mechanism ("relu" | "topk" | "batchtopk")."""
        return self.arch

    def _allowed_archs(self) -> tuple[str, ...]:
        return ARCHS

    def validate(self) -> None:
        """Fill defaults that depend on other fields and raise ValueError on a bad value or combination."""
        if self.arch not in self._allowed_archs():
            raise ValueError(f"unknown arch {self.arch!r}: expected one of {self._allowed_archs()}")
        if self.mechanism not in ARCHS:
            raise ValueError(f"unknown sparsity {self.mechanism!r}: expected one of {ARCHS}")
        _check_int("d_in", self.d_in, lo=1)
        _check_int("width", self.width, lo=1)
        _check_int("k", self.k, lo=1)
        if self.mechanism in ("topk", "batchtopk") and self.k > self.width:
            raise ValueError(f"k={self.k} must be <= width={self.width}")
        if self.l1_coeff is None:
            self.l1_coeff = 5.0 / self.d_in
        _check_float("l1_coeff", self.l1_coeff, lo=0.0)
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_in // 2, self.width))
        _check_int("aux_k", self.aux_k, lo=1)
        if self.aux_k > self.width:
            raise ValueError(f"aux_k={self.aux_k} must be <= width={self.width}")
        _check_float("aux_coeff", self.aux_coeff, lo=0.0)
        _check_float("threshold_beta", self.threshold_beta, lo=0.0)
        if self.threshold_beta >= 1.0:
            raise ValueError(f"threshold_beta={self.threshold_beta} must be in [0, 1)")
        _check_float("input_scale", self.input_scale)
        if self.input_scale <= 0:
            raise ValueError(f"input_scale={self.input_scale} must be > 0")
        _check_int("seed", self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**d)


def _check_int(name: str, value: Any, lo: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={value} must be >= {lo}")


def _check_float(name: str, value: Any, lo: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={value} must be >= {lo}")


class ForwardOutput(NamedTuple):
    """What `SAE.forward` returns."""

    x_hat_BTD: Tensor
    """Reconstruction of the (scaled) input."""
    codes_BTF: Tensor
    """Sparse codes (dense tensor, zeros where inactive)."""
    loss: Tensor
    """Scalar total loss, equal to ``sum(losses.values())``."""
    losses: dict[str, Tensor]
    """Each weighted loss term by name: "mse", "l1" or "aux", and for the TRSAE "pos_l1", "gate"."""


# --------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type["SAE"]] = {}


def register_sae(arch: str) -> Callable[[type["SAE"]], type["SAE"]]:
    """Class decorator: make `make_sae` / `load_sae` build this class for `arch`."""

    def deco(cls: type["SAE"]) -> type["SAE"]:
        cls.arch = arch
        _REGISTRY[arch] = cls
        return cls

    return deco


def make_sae(cfg: SAEConfig) -> "SAE":
    """Build the SAE class registered for `cfg.arch` (import trsae.temporal first for "trsae")."""
    if cfg.arch not in _REGISTRY:
        raise ValueError(f"no SAE registered for arch {cfg.arch!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[cfg.arch](cfg)


def load_sae(directory: str | os.PathLike) -> "SAE":
    """Load an SAE written by `SAE.save`, whatever its class; returned in eval mode."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    arch = meta["arch"]
    if arch not in _REGISTRY:  # e.g. "trsae": its module registers it on import
        importlib.import_module(meta["module"])
    cls = _REGISTRY.get(arch)
    if cls is None or cls.__name__ != meta["class"]:
        raise ValueError(f"{directory}: saved class {meta['class']} (arch {arch!r}) is not registered")
    sae = cls(cls.config_class.from_dict(meta["config"]))
    sae.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return sae.eval()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


# --------------------------------------------------------------------------------------------- sparse helpers


class _PairPreacts(torch.autograd.Function):
    """``z_NF[rows_M, cols_M]`` re-attached to the graph of
    ``z = x_ND @ W_enc_DF + bias_F + ctx_NC @ U_FC^T + onehot(bucket_N) @ P_FB^T`` (terms optional, None).

    Forward only gathers the precomputed z. Backward builds the pair gradients once as a sparse ``[F, N]``
    matrix G and returns ``dW_enc = (G x)^T``, ``dU = G ctx``, ``dP``, ``dbias`` by index_add, and ``dx``,
    ``dctx`` by embedding-bags over the pairs (only those that are needed). Never forms a dense ``[N, F]``
    gradient and never computes ``dL/dx`` unless x requires it. Pairs may repeat (they are summed);
    `segs` gives the sizes of consecutive runs of pairs each sorted by row.
    """

    @staticmethod
    def forward(ctx, z_NF, rows_M, cols_M, segs, x_ND, W_enc_DF, bias_F, ctx_NC, U_FC, P_FB, bucket_N):
        ctx.segs = segs
        ctx.shape = tuple(z_NF.shape)
        ctx.n_buckets = 0 if P_FB is None else P_FB.shape[1]
        ctx.save_for_backward(rows_M, cols_M, x_ND, W_enc_DF, ctx_NC, U_FC, bucket_N)
        return z_NF[rows_M, cols_M]

    @staticmethod
    def backward(ctx, grad_M):
        rows_M, cols_M, x_ND, W_enc_DF, ctx_NC, U_FC, bucket_N = ctx.saved_tensors
        n, f = ctx.shape
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 11
        G_FN = torch.sparse_coo_tensor(torch.stack([cols_M, rows_M]), grad_M, (f, n), check_invariants=False)
        if need[4]:
            grads[4] = _segment_bags(rows_M, cols_M, grad_M, W_enc_DF.T.contiguous(), n, ctx.segs)
        if need[5]:
            grads[5] = torch.sparse.mm(G_FN, x_ND).T
        if need[6]:
            grads[6] = grad_M.new_zeros(f).index_add_(0, cols_M, grad_M)
        if need[7]:
            grads[7] = _segment_bags(rows_M, cols_M, grad_M, U_FC, n, ctx.segs)
        if need[8]:
            grads[8] = torch.sparse.mm(G_FN, ctx_NC)
        if need[9]:
            nb = ctx.n_buckets
            flat_M = cols_M * nb + bucket_N[rows_M]
            grads[9] = grad_M.new_zeros(f * nb).index_add_(0, flat_M, grad_M).view(f, nb)
        return tuple(grads)


def _segment_bags(rows_M: Tensor, cols_M: Tensor, w_M: Tensor, table_FA: Tensor, n_rows: int,
                  segs: tuple[int, ...]) -> Tensor:
    """``out[n] = sum_{m: rows[m]=n} w[m] table[cols[m]]``, for pairs made of row-sorted runs `segs`."""
    out_NA = None
    start = 0
    for size in segs:
        sl = slice(start, start + size)
        part = decode_pairs(rows_M[sl], cols_M[sl], w_M[sl], table_FA, n_rows)
        out_NA = part if out_NA is None else out_NA + part
        start += size
    return out_NA


def _bag_offsets(rows_M: Tensor, n_rows: int) -> Tensor:
    """Start of each row's run in `rows_M` (sorted), as `embedding_bag` offsets."""
    counts_N = torch.bincount(rows_M, minlength=n_rows)
    return counts_N.cumsum(0) - counts_N


def decode_pairs(rows_M: Tensor, cols_M: Tensor, vals_M: Tensor, W_dec_FD: Tensor, n_rows: int) -> Tensor:
    """``sum_{m: rows[m]=n} vals[m] W_dec[cols[m]]`` for each row n -> ``[n_rows, D]`` (rows_M sorted)."""
    offsets_N = _bag_offsets(rows_M, n_rows)
    return tnf.embedding_bag(cols_M, W_dec_FD, offsets_N, mode="sum", per_sample_weights=vals_M)


def topk_pairs(z_NF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of every row, as (rows_M, cols_M) pairs sorted by row, M = N k."""
    n = z_NF.shape[0]
    cols_NK = z_NF.topk(k, dim=1, sorted=False).indices
    rows_M = torch.arange(n, device=z_NF.device).repeat_interleave(k)
    return rows_M, cols_NK.reshape(-1)


def batch_topk_pairs(z_NF: Tensor, k: int, mask_N: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k * n_valid`` largest entries of the valid rows of z, as (rows_M, cols_M) sorted row-major.

    Exact: candidates are the entries >= a threshold estimated on a strided sample of at most 64 rows (set
    to keep about twice the needed count); if fewer than ``k * n_valid`` entries pass, it falls back to a
    flat top-k over all valid entries. This avoids a top-k over all N*F entries, which is ~10x slower on CPU.
    """
    n, f = z_NF.shape
    dev = z_NF.device
    valid_V = torch.arange(n, device=dev) if mask_N is None else mask_N.nonzero().squeeze(1)
    n_valid = valid_V.numel()
    m = k * n_valid
    if m == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty
    n_sample = min(n_valid, 64)
    if n_sample < n_valid:
        sample_S = valid_V[torch.linspace(0, n_valid - 1, n_sample, device=dev).long()]
        z_sample = z_NF.index_select(0, sample_S).flatten()
        tau = z_sample.topk(min(z_sample.numel(), 2 * k * n_sample), sorted=False).values.min()
        cand_NF = z_NF >= tau
        if mask_N is not None:
            cand_NF &= mask_N[:, None]
        rows_C, cols_C = cand_NF.nonzero(as_tuple=True)
        if rows_C.numel() >= m:
            top = z_NF[rows_C, cols_C].topk(m, sorted=False).indices.sort().values
            return rows_C[top], cols_C[top]
    z_valid = z_NF if mask_N is None else z_NF.index_select(0, valid_V)
    top = z_valid.flatten().topk(m, sorted=False).indices.sort().values
    return valid_V[top // f], top % f


# --------------------------------------------------------------------------------------------- the SAE


@dataclass
class _EncState:
    """Per-batch encoder inputs shared by the dense and the sparse paths (subclasses add fields)."""

    x_ND: Tensor
    bias_F: Tensor  # b_enc - b_dec @ W_enc
    mask_N: Tensor
    B: int
    T: int
    extra: dict[str, Any]


class SAE(nn.Module):
    """Base class of every SAE; implements the three per-token mechanisms (`cfg.mechanism`).

    Parameters: ``W_enc [D, F]``, ``b_enc [F]``, ``W_dec [F, D]`` (rows unit-norm at init, ``W_enc = W_dec^T``
    at init), ``b_dec [D]`` (zero; a trainer may set it to the data mean). batchtopk adds the buffer
    ``threshold`` (-1 until the first training batch; eval mode falls back to per-token TopK while unset).
    """

    arch: str = ""
    config_class: type[SAEConfig] = SAEConfig

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if self.arch and cfg.arch != self.arch:
            raise ValueError(f"{type(self).__name__} needs arch={self.arch!r}, got {cfg.arch!r}")
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec_FD = torch.randn(cfg.width, cfg.d_in, generator=gen)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.W_enc = nn.Parameter(W_dec_FD.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.mechanism == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0))
        self._init_extra(gen)

    def _init_extra(self, gen: torch.Generator) -> None:
        """Hook for subclasses: create extra parameters with the same generator."""

    # ----------------------------------------------------------------- encoder pieces
    @property
    def mechanism(self) -> str:
        return self.cfg.mechanism

    def _enc_state(self, x_BTD: Tensor, pos_BT: Tensor | None, mask_BT: Tensor | None) -> _EncState:
        B, T, D = x_BTD.shape
        if D != self.cfg.d_in:
            raise ValueError(f"expected inputs [B, T, {self.cfg.d_in}], got {tuple(x_BTD.shape)}")
        if mask_BT is None:
            mask_N = torch.ones(B * T, dtype=torch.bool, device=x_BTD.device)
        else:
            mask_N = mask_BT.reshape(B * T).bool()
        bias_F = self.b_enc - self.b_dec @ self.W_enc
        return _EncState(x_BTD.reshape(B * T, D), bias_F, mask_N, B, T, {})

    def _dense_preacts(self, st: _EncState) -> Tensor:
        """``z_NF`` for every token and latent (autograd-capable; subclasses add terms in place)."""
        return torch.addmm(st.bias_F, st.x_ND, self.W_enc)

    def _preacts_at(self, st: _EncState, z_NF: Tensor, rows_M: Tensor, cols_M: Tensor,
                    segs: tuple[int, ...]) -> Tensor:
        """``z_NF[rows, cols]`` re-attached to the graph (same values, the gradients of `_dense_preacts`).
        `segs`: sizes of the consecutive row-sorted runs of pairs."""
        return _PairPreacts.apply(z_NF, rows_M, cols_M, segs, st.x_ND, self.W_enc, st.bias_F,
                                  *self._pair_terms(st))

    def _pair_terms(self, st: _EncState) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """(ctx_NC, U_FC, P_FB, bucket_N) of the low-rank and positional terms of z (subclasses)."""
        return None, None, None, None

    def _extra_losses(self, st: _EncState) -> dict[str, Tensor]:
        """Hook for subclasses: additional weighted loss terms."""
        return {}

    def _select(self, z_NF: Tensor, mask_N: Tensor) -> tuple[Tensor, Tensor]:
        """Active (row, latent) pairs of a TopK-style mechanism, rows sorted."""
        if self.mechanism == "topk" or (self.mechanism == "batchtopk" and not self.training
                                        and float(self.threshold) < 0):
            return topk_pairs(z_NF, self.cfg.k)
        if self.training:
            return batch_topk_pairs(z_NF, self.cfg.k, mask_N)
        return (z_NF > self.threshold).nonzero(as_tuple=True)

    @torch.no_grad()
    def _update_threshold(self, vals_M: Tensor) -> None:
        positive = vals_M[vals_M > 0]
        if positive.numel() == 0:
            return
        low = positive.min()
        if float(self.threshold) < 0:
            self.threshold.copy_(low)
        else:
            beta = self.cfg.threshold_beta
            self.threshold.mul_(beta).add_((1 - beta) * low)

    def _sparse_codes(self, st: _EncState, update_stats: bool = False, dead_F: Tensor | None = None):
        """TopK-style codes as pairs.

        Returns (z_NF without graph, rows_M, cols_M, vals_M, aux) where vals_M carries the graph when grad
        is enabled and aux is None or (rows_A, cols_A, vals_A, k_aux, n_dead) for the AuxK loss: the
        `aux_k` largest pre-activations among the dead latents of each valid token. Main and aux pairs
        share one `_PairPreacts` call, so the backward does one sparse product per weight.
        """
        with torch.no_grad():
            z_NF = self._dense_preacts(st)
            rows_M, cols_M = self._select(z_NF, st.mask_N)
            if update_stats and self.mechanism == "batchtopk" and self.training:
                self._update_threshold(z_NF[rows_M, cols_M])
            aux_pairs = self._aux_pairs(st, z_NF, dead_F) if dead_F is not None else None
        rows_all, cols_all, segs = rows_M, cols_M, (rows_M.numel(),)
        if aux_pairs is not None:
            rows_all = torch.cat([rows_M, aux_pairs[0]])
            cols_all = torch.cat([cols_M, aux_pairs[1]])
            segs = (rows_M.numel(), aux_pairs[0].numel())
        if torch.is_grad_enabled():
            vals_all = self._preacts_at(st, z_NF, rows_all, cols_all, segs).relu()
        else:
            vals_all = z_NF[rows_all, cols_all].relu()
        vals_M = vals_all[: rows_M.numel()]
        aux = None
        if aux_pairs is not None:
            aux = (aux_pairs[0], aux_pairs[1], vals_all[rows_M.numel():], aux_pairs[2], aux_pairs[3])
        return z_NF, rows_M, cols_M, vals_M, aux

    def _aux_pairs(self, st: _EncState, z_NF: Tensor, dead_F: Tensor):
        dead_G = dead_F.to(z_NF.device).bool().nonzero().squeeze(1)
        valid_V = st.mask_N.nonzero().squeeze(1)
        if dead_G.numel() == 0 or valid_V.numel() == 0 or self.cfg.aux_coeff == 0:
            return None
        k_aux = min(self.cfg.aux_k, dead_G.numel())
        z_VG = z_NF.index_select(1, dead_G).index_select(0, valid_V)
        cols_A = dead_G[z_VG.topk(k_aux, dim=1, sorted=False).indices].reshape(-1)
        return valid_V.repeat_interleave(k_aux), cols_A, k_aux, dead_G.numel()

    # ----------------------------------------------------------------- public API
    def pre_acts(self, x_BTD: Tensor, pos_BT: Tensor | None = None, mask_BT: Tensor | None = None) -> Tensor:
        """Pre-activations ``z_BTF`` (dense, differentiable)."""
        st = self._enc_state(x_BTD, pos_BT, mask_BT)
        return self._dense_preacts(st).reshape(st.B, st.T, -1)

    def activate(self, z_BTF: Tensor, mask_BT: Tensor | None = None) -> Tensor:
        """Sparsity nonlinearity on pre-activations -> ``codes_BTF`` (batchtopk follows train/eval mode;
        masked tokens get no codes from the batch selection in training mode)."""
        B, T, Fw = z_BTF.shape
        if self.mechanism == "relu":
            return z_BTF.relu()
        z_NF = z_BTF.reshape(B * T, Fw)
        mask_N = torch.ones(B * T, dtype=torch.bool, device=z_BTF.device) if mask_BT is None \
            else mask_BT.reshape(-1).bool()
        rows_M, cols_M = self._select(z_NF.detach(), mask_N)
        codes_NF = torch.zeros_like(z_NF).index_put_((rows_M, cols_M), z_NF[rows_M, cols_M].relu())
        return codes_NF.reshape(B, T, Fw)

    def encode(self, x_BTD: Tensor, pos_BT: Tensor | None = None, mask_BT: Tensor | None = None) -> Tensor:
        """Codes ``codes_BTF`` of (already scaled) inputs."""
        st = self._enc_state(x_BTD, pos_BT, mask_BT)
        if self.mechanism == "relu":
            return self._dense_preacts(st).relu().reshape(st.B, st.T, -1)
        z_NF, rows_M, cols_M, vals_M, _ = self._sparse_codes(st)
        codes_NF = torch.zeros_like(z_NF).index_put_((rows_M, cols_M), vals_M)
        return codes_NF.reshape(st.B, st.T, -1)

    def decode(self, codes_BTF: Tensor) -> Tensor:
        """Reconstruction ``x_hat_BTD = codes @ W_dec + b_dec`` (dense)."""
        return codes_BTF @ self.W_dec + self.b_dec

    def reconstruct(self, x_raw_BTD: Tensor, pos_BT: Tensor | None = None,
                    mask_BT: Tensor | None = None) -> Tensor:
        """Reconstruction of raw (unscaled) activations: scale by `input_scale`, encode, decode, unscale."""
        s = self.cfg.input_scale
        st = self._enc_state(x_raw_BTD * s, pos_BT, mask_BT)
        if self.mechanism == "relu":
            x_hat_ND = self._dense_preacts(st).relu() @ self.W_dec
        else:
            _, rows_M, cols_M, vals_M, _ = self._sparse_codes(st)
            x_hat_ND = decode_pairs(rows_M, cols_M, vals_M, self.W_dec, st.B * st.T)
        return ((x_hat_ND + self.b_dec) / s).reshape(st.B, st.T, -1)

    def forward(self, x_BTD: Tensor, mask_BT: Tensor | None = None, pos_BT: Tensor | None = None,
                dead_F: Tensor | None = None) -> ForwardOutput:
        """Reconstruction, codes and every loss term, averaged over the tokens where `mask_BT` is True.

        `dead_F` (bool ``[F]``): latents the trainer counts as dead; topk/batchtopk add the AuxK loss over them
        (relu ignores it). In training mode batchtopk also updates its inference threshold.
        """
        st = self._enc_state(x_BTD, pos_BT, mask_BT)
        N, D = st.x_ND.shape
        maskf_N = st.mask_N.to(st.x_ND.dtype)
        n_valid = maskf_N.sum().clamp_min(1.0)
        zero = st.x_ND.new_zeros(())
        losses: dict[str, Tensor] = {}
        if self.mechanism == "relu":
            codes_NF = self._dense_preacts(st).relu()
            x_hat_ND = codes_NF @ self.W_dec + self.b_dec
            l1_N = codes_NF @ self.W_dec.norm(dim=1)
            losses["mse"] = ((x_hat_ND - st.x_ND).pow(2).sum(1) / D * maskf_N).sum() / n_valid
            losses["l1"] = self.cfg.l1_coeff * (l1_N * maskf_N).sum() / n_valid
        else:
            z_NF, rows_M, cols_M, vals_M, aux = self._sparse_codes(st, update_stats=True, dead_F=dead_F)
            x_hat_ND = decode_pairs(rows_M, cols_M, vals_M, self.W_dec, N) + self.b_dec
            codes_NF = torch.zeros_like(z_NF).index_put_((rows_M, cols_M), vals_M)
            losses["mse"] = ((x_hat_ND - st.x_ND).pow(2).sum(1) / D * maskf_N).sum() / n_valid
            losses["aux"] = zero if aux is None else self._aux_loss(st, x_hat_ND, *aux)
        losses.update(self._extra_losses(st))
        loss = torch.stack(list(losses.values())).sum()
        return ForwardOutput(x_hat_ND.reshape(st.B, st.T, D), codes_NF.reshape(st.B, st.T, -1), loss, losses)

    def _aux_loss(self, st: _EncState, x_hat_ND: Tensor, rows_A: Tensor, cols_A: Tensor, vals_A: Tensor,
                  k_aux: int, n_dead: int) -> Tensor:
        """AuxK (Gao et al. 2024): the dead latents' top-`aux_k` codes reconstruct the residual."""
        e_hat_VD = tnf.embedding_bag(cols_A.view(-1, k_aux), self.W_dec, mode="sum",
                                     per_sample_weights=vals_A.view(-1, k_aux))
        e_VD = (st.x_ND - x_hat_ND).detach()[rows_A.view(-1, k_aux)[:, 0]]
        scale = min(n_dead / self.cfg.aux_k, 1.0)
        nmse = (e_hat_VD - e_VD).pow(2).sum() / e_VD.pow(2).sum().clamp_min(1e-12)
        return self.cfg.aux_coeff * scale * nmse

    # ----------------------------------------------------------------- trainer helpers
    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-8) -> None:
        """Rescale W_dec rows to unit norm and every per-latent encoder term by the same norm, so that a
        ReLU SAE computes the same function (and the same norm-weighted L1) before and after."""
        norms_F = self.W_dec.norm(dim=1).clamp_min(eps)
        self.W_dec.div_(norms_F[:, None])
        self._scale_latents_(norms_F)

    def _scale_latents_(self, scale_F: Tensor) -> None:
        """Multiply every encoder term of latent f by scale_F[f] (subclasses extend)."""
        self.W_enc.mul_(scale_F[None, :])
        self.b_enc.mul_(scale_F)

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
        """Optimiser parameter groups with their learning rates (one group here; TRSAE adds its own)."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``sae.safetensors`` and ``config.json`` (class, module, arch, config) atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
        meta = {"format": FORMAT_VERSION, "class": type(self).__name__, "module": type(self).__module__,
                "arch": self.cfg.arch, "config": self.cfg.to_dict()}
        text = json.dumps(meta, indent=2, sort_keys=True)
        _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SAE":
        return load_sae(directory)


@register_sae("relu")
class ReLUSAE(SAE):
    """ReLU + decoder-norm-weighted L1 (Anthropic April 2024 style)."""


@register_sae("topk")
class TopKSAE(SAE):
    """Per-token TopK with the AuxK dead-latent loss (Gao et al. 2024)."""


@register_sae("batchtopk")
class BatchTopKSAE(SAE):
    """BatchTopK with a running inference threshold (Bussmann et al. 2024)."""
