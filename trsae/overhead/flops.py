"""Parameters and FLOPs of the SAEs, computed from their configs (no timing).

Shapes: B sequences of T tokens, N = B T, D = d_in, F = width, k active latents per token, K = d_k, V = d_v,
C = d_ctx, Bk = n_buckets.

**FLOP model** (`flop_breakdown`). A FLOP is a multiply or an add: a matrix product of m multiply-adds counts
2m. What is counted is what `trsae.saes` actually runs, per token:

- encoder ``x @ W_enc``: 2DF (dense for every arch; TopK selection, ReLU, the scatter of the codes into a
  dense ``[N, F]`` tensor, index_adds and other O(F) or O(k) elementwise work are not counted);
- decoder: TopK / BatchTopK decode with an ``embedding_bag`` over the k active pairs, 2kD (BatchTopK: k on
  average); ReLU multiplies the dense codes, 2FD, plus the L1 read-out ``codes @ ||W_dec||``, 2F;
- TRSAE context: ``x @ W_qkv`` 2D(2K+V); the prefix-sum state ``k_s ⊗ [v_s, 1]``, its cumulative sum and the
  window difference, 3K(V+1) (elementwise, counted) and the query contraction 2K(V+1), all independent of
  the window w; ``W_o`` 2VC when d_v != d_ctx; ``ctx @ (g U)^T`` 2CF and the position term, which the
  implementation computes as a one-hot product ``onehot(bucket) @ P^T``, 2 Bk F (both fused in one addmm);
  per-token gates add ``q @ G^T``, 2KF;
- backward (train), from the actual structure, not "3x forward": the TopK-style path is sparse (see
  `trsae.saes.sparse_ops.PairPreacts`): decoder 4kD (dW_dec rows and d(codes)), encoder 2kD (dW_enc; dL/dx is never
  formed), U 4kC; the context path gets a dense backward 2D(2K+V) (dW_qkv only) + 9K(V+1) + 4VC.
  ReLU is dense: decoder 4FD, L1 4F, encoder 2DF; a ReLU-sparsity TRSAE adds 4(C+Bk)F (2 Bk F without
  attention). So a TopK train step is ~1x its forward in FLOPs and a ReLU step ~2.5x.

Per step (not per token) come the bias fold ``b_enc - b_dec @ W_enc`` (2DF forward, 6DF train), ``g * U``
(FC, 4FC train) and, in training, Adam (`ADAM_FLOPS_PER_PARAM` per parameter) and the decoder-norm work of
``remove_parallel_grad_`` + ``normalize_decoder_`` of the unit-norm (TopK-style) parts, ~11FD, and the
norm-weighted penalties, ~5FD: these two are approximate elementwise counts. `flops_per_token(..., n_tokens=N)` spreads them over the N tokens.

Each registered part declares its own terms (the ``flops`` classmethods of `trsae.saes.encoders.TokenEncoder`
and its subclasses, and of `trsae.saes.sparsity.Sparsity` and its subclasses: TFA's prediction, T-SAE's contrastive
logits, Matryoshka's inner levels and JumpReLU's penalty are described there); `flop_breakdown` composes them.
"""

from __future__ import annotations

from typing import Any, Sequence

from trsae.saes import SAEConfig, make_sae
from trsae.saes.config import part_classes

ARCH_NAMES = ("topk", "batchtopk", "relu", "trsae")
"""Architectures of the grid; "trsae" is a TopK-sparsity TRSAE (matched to the TopK baseline)."""
REFERENCE = "topk"
"""What the ratios are taken against."""
WIDTHS_MULT = (2, 4, 8, 16)
DENSE_PRODUCTS = ("encoder", "context_qkv", "context_query", "context_out", "predictor", "tfa_codes", "tfa_qk",
                  "tfa_v", "tfa_scores", "tfa_mix", "tfa_out", "tfa_decode")
"""The per-token forward terms the parts compute as plain matrix products (mm, addmm, bmm), which torch's
FlopCounterMode counts (it skips embedding_bag, in-place addmm_, sparse and elementwise work): the tests hold every
registered part's encode to them."""
ADAM_FLOPS_PER_PARAM = 13
"""torch Adam per parameter: lerp (3) + mul/addcmul (4) + sqrt/div/add (3) + addcdiv (3), elementwise."""


# --------------------------------------------------------------------------------------------- configs


def make_config(arch: str, d_in: int, width: int, k: int = 32, window: int = 16, seed: int = 0,
                **trsae_kw: Any) -> SAEConfig:
    """Config of one grid architecture: a per-token baseline (`window` ignored) or a TopK TRSAE with
    `trsae_kw`."""
    if arch == "trsae":
        trsae_kw.setdefault("w_start", min(1, window))
        return SAEConfig.build(d_in, width, "topk", "trsae", k=k, window=window, seed=seed, **trsae_kw)
    return SAEConfig.build(d_in, width, arch, seed=seed, **({} if arch == "relu" else {"k": k}))


def config_from_dict(d: dict[str, Any]) -> SAEConfig:
    """The config a `make_config` config's ``to_dict()`` came from."""
    return SAEConfig.from_dict(d)


_COMPONENT = {"W_enc": "encoder", "W_dec": "decoder", "b_enc": "biases", "b_dec": "biases", "W_qkv": "attn_qkv",
              "W_o": "attn_out", "gate_logit": "gates", "G": "gates"}
"""Table names of the parameters the tables group; any other parameter is its own component, by its name."""


def param_count(cfg: SAEConfig) -> dict[str, int]:
    """Trainable parameters by component, counted on the module `make_sae(cfg)` creates (every registered part,
    whatever parameters it declares: TFA's ``W_qk``/``W_v``/``W_o``/``b_o``, a predicting TRSAE's
    ``V_pred``/``b_pred``), and their "total"."""
    out: dict[str, int] = {}
    for name, p in make_sae(cfg).named_parameters():
        leaf = name.split(".")[-1]
        key = leaf if leaf == "W_o" and cfg.encoder.name == "tfa" else _COMPONENT.get(leaf, leaf)  # TFA's own W_o
        out[key] = out.get(key, 0) + p.numel()
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------- FLOPs


def flop_breakdown(cfg: SAEConfig, mode: str, ctx_len: int | None = None,
                   n_tokens: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(per-token FLOPs, per-step FLOPs) by component for `mode` "encode" (eval `encode`, what inference
    timings measure), "forward" (encode + decode + losses) or "train" (forward + backward + optimiser).

    Each registered part declares its own terms (``flops`` of its encoder and sparsity classes: the encoder's
    forward, the sparsity's decoding and losses, then the backward of each, then the per-step work); this adds
    Adam over the parameters `make_sae(cfg)` holds. ``ctx_len`` (T) and ``n_tokens`` (tokens per step) are needed
    only by parts whose cost grows with them (TFA's attention over every earlier token, T-SAE's contrastive
    logits between the pairs of a step); such a part without them raises. See the module docstring for the model."""
    if mode not in ("encode", "forward", "train"):
        raise ValueError(f"mode must be 'encode', 'forward' or 'train', got {mode!r}")
    sparsity = part_classes("sparsity", cfg.sparsity.name)[1]
    encoder = part_classes("encoder", cfg.encoder.name)[1]
    e_tok, e_bwd, e_step = encoder.flops(cfg, mode, sparsity.dense_codes, ctx_len, n_tokens)
    s_tok, s_bwd, s_step = sparsity.flops(cfg, mode)
    tok = e_tok | s_tok | s_bwd | e_bwd
    norms = e_step.pop("decoder_norm", 0) + s_step.pop("decoder_norm", 0)
    step = e_step | s_step
    if mode == "train":
        step["optimizer"] = ADAM_FLOPS_PER_PARAM * param_count(cfg)["total"]
    if norms:
        step["decoder_norm"] = norms
    return tok, step


def flops_per_token(cfg: SAEConfig, train: bool, n_tokens: int | None = None, ctx_len: int | None = None) -> float:
    """FLOPs per token of a training step (`train`) or of inference `encode`; with `n_tokens` (tokens per
    step) the per-step work (bias fold, Adam, decoder norms) is spread over them, else it is left out."""
    tok, step = flop_breakdown(cfg, "train" if train else "encode", ctx_len, n_tokens)
    return float(sum(tok.values()) + (sum(step.values()) / n_tokens if n_tokens else 0.0))


def flop_table(cfg: SAEConfig, n_tokens: int | None = None, ctx_len: int | None = None) -> str:
    """Text table of `flop_breakdown` per token (encode and train), with the per-step work per token
    when `n_tokens` is given."""
    lines = [f"{'component':18s}{'encode':>12s}{'train':>12s}   (FLOPs per token)"]
    enc, enc_step = flop_breakdown(cfg, "encode", ctx_len, n_tokens)
    tr, tr_step = flop_breakdown(cfg, "train", ctx_len, n_tokens)
    for key in tr:
        lines.append(f"{key:18s}{enc.get(key, 0):12,.0f}{tr[key]:12,.0f}")
    for key in tr_step if n_tokens else ():
        lines.append(f"{key + ' (step)':18s}{enc_step.get(key, 0) / n_tokens:12,.0f}{tr_step[key] / n_tokens:12,.0f}")
    total_enc, total_tr = (flops_per_token(cfg, t, n_tokens, ctx_len) for t in (False, True))
    lines.append(f"{'total':18s}{total_enc:12,.0f}{total_tr:12,.0f}")
    return "\n".join(lines)


def static_rows(archs: Sequence[str] = ARCH_NAMES, widths_mult: Sequence[int] = WIDTHS_MULT, d_in: int = 640,
                k: int = 32, window: int = 16, tokens: int | None = None,
                trsae_kw: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Deterministic rows (no timing): parameters and FLOPs per token for each arch and width, with ratios
    to TopK. FLOPs do not depend on w (O(T) attention) nor on T; `tokens` spreads the per-step work."""
    rows = []
    for m in widths_mult:
        ref = make_config(REFERENCE, d_in, m * d_in, k)
        for a in archs:
            cfg = make_config(a, d_in, m * d_in, k, window, **(trsae_kw or {}))
            row = {"arch": a, "width_mult": m, "width": m * d_in, "params": param_count(cfg)["total"]}
            for mode, train in (("train", True), ("encode", False)):
                row[f"mflops_{mode}"] = flops_per_token(cfg, train, tokens) / 1e6
                row[f"flops_{mode}_ratio"] = flops_per_token(cfg, train, tokens) / flops_per_token(ref, train, tokens)
            row["params_ratio"] = row["params"] / param_count(ref)["total"]
            rows.append(row)
    return rows
