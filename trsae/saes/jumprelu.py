"""JumpReLU sparsity (Rajamanoharan et al. 2024, "Jumping ahead"): ``f = z * H(z - theta)`` with a learned
per-latent threshold ``theta``, trained through straight-through estimators with a rectangle kernel of width
``bandwidth``, and an L0 penalty that pulls the L0 to a target k.

The straight-through functions are checked against SAELens 6.54.12 (``sae_lens/saes/jumprelu_sae.py``: ``JumpReLU``,
``Step``, ``JumpReLUSAE.encode``, ``calculate_aux_loss`` with ``jumprelu_ste_to_input=False``;
tests/test_sae_reference.py compares forward values and gradients numerically):

- forward ``JumpReLU(z, theta) = z * (z > theta)``; backward to z: ``(z > theta) * g``; to theta:
  ``-sum_t (theta / bw) * rect((z - theta) / bw) * g`` (``rect(u) = 1`` for ``|u| < 1/2``).
- ``l0_t = sum_f Step(z_tf, theta_f)`` with ``Step = H(z - theta)``, whose backward reaches theta only:
  ``-sum_t (1 / bw) rect((z - theta) / bw) g``.
- loss ``l0``, by `JumpReLUConfig.penalty`: "batch" (default) ``l0_coeff * (mean_valid_t l0_t / k - 1)^2``, the
  form of dictionary_learning's ``JumpReluTrainer`` (commit 60ec6bf, the trainer of SAEBench's JumpReLU SAEs, which
  takes the step of the codes f rather than of z: the same value, and half the kernel's window for theta's
  gradient); "token" ``l0_coeff * mean_valid_t (2 / k) (l0_t - k)^2``, SAELens's "quadratic" mode (Gemma Scope 2).
  The per-token form pulls every token's L0 to k, and its straight-through gradient balances where the tokens near
  a threshold have L0 k, not where the mean is k: on gemma-3-270m layer 6 (300k tokens, val) its L0 stayed at 37 for
  a target of 32 at 1, 4 and 16 times its weight, where the batch form follows the weight to the target.
- ``pre_act = pre_act_coeff * mean_valid_t sum_f dead_f relu(theta_f - z_tf) ||W_dec[f]||`` (SAELens's
  ``calculate_pre_act_loss``, Anthropic's January 2025 revival term) over the latents the trainer counts as dead:
  the only gradient a dead latent's encoder gets, so nothing stays dead for good.

Optimiser. Adam without momentum (``adam_beta1`` 0: the paper's and dictionary_learning's ``betas=(0.0, 0.999)``)
for the whole SAE. With Adam's default 0.9 the thresholds oscillate against the encoder at the rates the other
families train at: at lr 1.6e-3 and the default weight (gemma-3-270m layer 6, 300k tokens) the training L0 swung
between 73 and 112 and the run ended at val L0 127 and FVU 1.98; without momentum, at val L0 57 and FVU 0.095.
dictionary_learning also clips the gradient norm at 1 (not done here) and warms the penalty up over its first 2,000
steps.

Initialisation. SAELens starts every threshold at 0.01 (`init_threshold`) and dictionary_learning at 0.001, where
nearly every latent fires; Adam then moves a threshold by about lr per step, which a run of a few hundred steps
cannot afford. Here, by default (``init="per_latent"``), each latent's threshold starts at its own (n+1)-th largest
pre-activation on the first training batch's V valid tokens, n = round(k V / F): every latent fires on the same
share k / F of that batch, so the mean L0 starts at k and every latent starts with a gradient. ``init="pooled"``
keeps one threshold for all latents (the (k V + 1)-th largest pre-activation of the batch): mean L0 k as well, but
the latents whose pre-activations sit below the pooled tail never fire and get no gradient (31 % of them stayed
dead over 100k tokens of gemma-3-270m layer 6). The MSE here is per dimension, so the L0 coefficient is the
references' divided by d_in.

Thresholds train at ``threshold_lr_mult`` (10) times the rate: at 1 they lag the encoder in a few-hundred-step run
(mean L0 62 for a target of 32). The pre-activation loss at ``pre_act_coeff`` 1 / d_in (the L0 penalty's weight)
keeps the dead latents under 1 % (SAELens's 3e-6, in these units, changed nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trsae.saes.config import PartConfig, check_float, check_int, register_part
from trsae.saes.sparsity import Codes, Sparsity


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class JumpReLUFn(torch.autograd.Function):
    """``z * (z > theta)``; straight-through gradient to theta (see the module docstring)."""

    @staticmethod
    def forward(ctx, z_NF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z_NF, theta_F)
        ctx.bandwidth = bandwidth
        return z_NF * (z_NF > theta_F)

    @staticmethod
    def backward(ctx, g_NF: Tensor):
        z_NF, theta_F = ctx.saved_tensors
        bw = ctx.bandwidth
        g_theta_F = -((theta_F / bw) * _rect((z_NF - theta_F) / bw) * g_NF).sum(0)
        return (z_NF > theta_F) * g_NF, g_theta_F, None


class StepFn(torch.autograd.Function):
    """``H(z - theta)``; straight-through gradient to theta only."""

    @staticmethod
    def forward(ctx, z_NF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z_NF, theta_F)
        ctx.bandwidth = bandwidth
        return (z_NF > theta_F).to(z_NF)

    @staticmethod
    def backward(ctx, g_NF: Tensor):
        z_NF, theta_F = ctx.saved_tensors
        bw = ctx.bandwidth
        return None, -((1.0 / bw) * _rect((z_NF - theta_F) / bw) * g_NF).sum(0), None


@dataclass
class JumpReLUConfig(PartConfig):
    """JumpReLU with a penalty around a target L0."""

    k: int = 32
    """Target mean L0 (active latents per token), the matched-L0 setting."""
    l0_coeff: float | None = None
    """Weight of the L0 penalty of `penalty`. None -> ``1 / d_in`` (1.0 in SAELens's and dictionary_learning's
    summed-MSE units)."""
    penalty: str = "batch"
    """"batch": ``(mean_t l0_t / k - 1)^2``, the batch's mean L0 pulled to k (dictionary_learning's
    ``JumpReluTrainer``, the trainer of SAEBench's JumpReLU SAEs); "token": ``mean_t (2/k) (l0_t - k)^2``, each
    token's L0 pulled to k (SAELens's "quadratic" mode, Gemma Scope 2)."""
    bandwidth: float = 0.05
    """Width of the rectangle kernel of the straight-through estimators (SAELens default)."""
    init_threshold: float | None = None
    """Initial threshold of every latent (SAELens: 0.01). None -> set on the first training batch by `init`."""
    init: str = "per_latent"
    """How the first training batch sets the thresholds when `init_threshold` is None: "per_latent" (each
    latent fires on a share k / F of the batch) or "pooled" (one threshold, the batch's mean L0 = k)."""
    pre_act_coeff: float | None = None
    """Weight of the dead latents' pre-activation loss (0 turns it off). None -> ``1 / d_in``, the L0 penalty's
    weight (SAELens's 3e-6 for Anthropic's setup, in this module's units, revived no latent in a 300-step run)."""
    adam_beta1: float = 0.0
    """Adam's beta1 for the whole SAE: 0, no momentum, as in the JumpReLU paper and dictionary_learning's
    ``JumpReluTrainer`` (``betas=(0.0, 0.999)``); 0.9 is Adam's default."""
    threshold_lr_mult: float = 10.0
    """Learning-rate multiplier of the thresholds: Adam moves a threshold by about lr x this per step, and at 1 the
    thresholds of a few-hundred-step run lag the encoder (mean L0 62 for a target of 32 on gemma-3-270m)."""

    def validate(self) -> None:
        check_int("k", self.k, lo=1)
        if self.init not in ("per_latent", "pooled"):
            raise ValueError(f"init must be 'per_latent' or 'pooled', got {self.init!r}")
        if self.penalty not in ("batch", "token"):
            raise ValueError(f"penalty must be 'batch' or 'token', got {self.penalty!r}")
        for name in ("l0_coeff", "init_threshold", "pre_act_coeff"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), lo=0.0)
        check_float("bandwidth", self.bandwidth)
        check_float("threshold_lr_mult", self.threshold_lr_mult)
        check_float("adam_beta1", self.adam_beta1, lo=0.0)
        if self.adam_beta1 >= 1:
            raise ValueError(f"adam_beta1 must be in [0, 1), got {self.adam_beta1}")
        if self.bandwidth <= 0 or self.threshold_lr_mult <= 0:
            raise ValueError("bandwidth and threshold_lr_mult must be > 0")

    def resolve(self, d_in: int, width: int) -> None:
        if self.k > width:
            raise ValueError(f"k={self.k} must be <= width={width}")
        if self.l0_coeff is None:
            self.l0_coeff = 1.0 / d_in
        if self.pre_act_coeff is None:
            self.pre_act_coeff = 1.0 / d_in


@register_part("sparsity", "jumprelu", JumpReLUConfig)
class JumpReLU(Sparsity):
    """Parameter ``threshold [F]`` (-1 until the first training batch when `init_threshold` is None)."""

    cfg: JumpReLUConfig
    unit_norm = True
    dense_codes = True

    @classmethod
    def flops(cls, cfg, mode):
        """Dense codes times the decoder (2FD; backward 4FD), the step functions of the L0 penalty (~2F; backward,
        with the thresholds' straight-through gradients, ~4F) and the unit-norm decoder step (~11FD)."""
        if mode == "encode":
            return {}, {}, {}
        D, F = cfg.d_in, cfg.width
        tok = {"decoder": 2 * F * D, "l0_penalty": 2 * F}
        if mode != "train":
            return tok, {}, {}
        return tok, {"decoder_bwd": 4 * F * D, "l0_penalty_bwd": 4 * F}, {"decoder_norm": 11 * F * D}

    def __init__(self, cfg: JumpReLUConfig, d_in: int, width: int):
        super().__init__(cfg, d_in, width)
        init = -1.0 if cfg.init_threshold is None else cfg.init_threshold
        self.threshold = nn.Parameter(torch.full((width,), float(init)))

    @torch.no_grad()
    def scale_latents_(self, scale_F: Tensor) -> None:
        if float(self.threshold[0]) >= 0:
            self.threshold.mul_(scale_F)

    def lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        return [([self.threshold], self.cfg.threshold_lr_mult)]

    def adam_betas(self) -> tuple[float, float]:
        return (self.cfg.adam_beta1, 0.999)

    @torch.no_grad()
    def _start(self, z_NF: Tensor, mask_N: Tensor) -> None:
        if float(self.threshold[0]) < 0:  # first training batch: mean L0 = k (z > theta keeps the values above)
            z_VF = z_NF[mask_N]
            V, F = z_VF.shape
            if self.cfg.init == "per_latent":  # theta_f: latent f's (n + 1)-th largest, n = k V / F
                n = min(max(1, round(self.cfg.k * V / F)), V - 1)
                self.threshold.copy_(z_VF.kthvalue(V - n, dim=0).values)
            else:  # one theta: the batch's (k V + 1)-th largest
                n_keep = min(self.cfg.k * V + 1, z_VF.numel())
                self.threshold.fill_(float(torch.topk(z_VF.flatten(), n_keep).values[-1]))
        self.threshold.clamp_(min=0.0)  # as SAELens: below 0 the gate would pass negative pre-activations

    def codes(self, enc, st, dead_F=None, update=False) -> Codes:
        z_NF = enc.dense(st)
        if update and self.training:
            self._start(z_NF.detach(), st.mask_N)
        st.extra["z_NF"] = z_NF
        st.extra["dead_F"] = dead_F
        return Codes(dense_NF=JumpReLUFn.apply(z_NF, self.threshold, self.cfg.bandwidth))

    def activate(self, z_NF: Tensor, mask_N: Tensor) -> Tensor:
        return z_NF * (z_NF > self.threshold)

    def saelens(self):
        if float(self.threshold.detach().min()) < 0:
            raise ValueError("this JumpReLU SAE has no threshold yet (it is set on the first training batch)")
        return {"architecture": "jumprelu"}, {"threshold": self.threshold.detach().clone()}

    @torch.no_grad()
    def load_saelens_(self, tensors: dict[str, Tensor]) -> None:
        self.threshold.copy_(tensors["threshold"])

    def losses(self, st, codes, x_hat_ND, W_dec_FD, b_dec_D) -> dict[str, Tensor]:
        k = self.cfg.k
        l0_N = StepFn.apply(st.extra["z_NF"], self.threshold, self.cfg.bandwidth).sum(1)
        maskf_N = st.mask_N.to(l0_N.dtype)
        n_valid = maskf_N.sum().clamp_min(1.0)
        if self.cfg.penalty == "batch":
            penalty = ((l0_N * maskf_N).sum() / n_valid / k - 1).pow(2)
        else:
            penalty = (2.0 / k * (l0_N - k).pow(2) * maskf_N).sum() / n_valid
        out = {"l0": self.cfg.l0_coeff * penalty}
        dead_F = st.extra.get("dead_F")
        if dead_F is None or self.cfg.pre_act_coeff == 0 or not bool(dead_F.any()):
            out["pre_act"] = l0_N.new_zeros(())
        else:
            gap_NF = (self.threshold - st.extra["z_NF"]).relu() * dead_F.to(l0_N.dtype)
            out["pre_act"] = self.cfg.pre_act_coeff * ((gap_NF @ W_dec_FD.norm(dim=1)) * maskf_N).sum() / n_valid
        return out
