"""Overhead accounting: the FLOP counter against a hand count and against torch's FlopCounterMode, parameter
counts against the modules, the profiler-based peak memory, the grid's plan and rows. No timed assertions."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trsae import overhead as O
from trsae import report as R
from trsae.overhead.grid import _rows
from trsae.saes import SAEConfig, make_sae

D, F, K = 8, 32, 2
SMALL = dict(d_in=D, width=F, k=K, window=2, d_k=2, d_v=3, d_ctx=4, n_buckets=4, n_exact_pos=2, pos_max=16)


def small_trsae(**kw) -> SAEConfig:
    kw = SMALL | kw
    sparsity = kw.pop("sparsity", "topk")
    if sparsity == "relu":
        kw.pop("k")
    return SAEConfig.build(kw.pop("d_in"), kw.pop("width"), sparsity, "trsae", **kw)


# ------------------------------------------------------------------------------------------ FLOPs


def test_flops_hand_count_small_trsae():
    """D=8, F=32, k=2, d_k=2, d_v=3, d_ctx=4 (so W_o exists), 4 position buckets, per-feature gates."""
    cfg = small_trsae()
    # encode, per token
    encoder = 2 * 8 * 32            # x @ W_enc                                   = 512
    qkv = 2 * 8 * (2 * 2 + 3)       # x @ W_qkv                                   = 112
    state = 3 * 2 * (3 + 1)         # k ⊗ [v, 1], cumsum, window difference        = 24
    query = 2 * 2 * (3 + 1)         # q . window state                             = 16
    w_o = 2 * 3 * 4                 # ctx_V @ W_o                                 = 24
    u = 2 * 4 * 32                  # ctx @ (g U)^T                               = 256
    pos = 2 * 4 * 32                # onehot(bucket) @ P^T                        = 256
    enc_tok = encoder + qkv + state + query + w_o + u + pos
    assert enc_tok == 1200
    # train = forward (+ sparse decode) + backward, per token
    decode = 2 * 2 * 8              # embedding_bag over k = 2 pairs              = 32
    dec_bwd = 4 * 2 * 8             # dW_dec rows + d(codes)                      = 64
    enc_bwd = 2 * 2 * 8             # dW_enc over the pairs (no dL/dx)             = 32
    u_bwd = 4 * 2 * 4               # dU + d(ctx) over the pairs                  = 32
    qkv_bwd = 2 * 8 * 7             # dW_qkv                                      = 112
    state_bwd = 9 * 2 * 4           # attention state backward                    = 72
    w_o_bwd = 4 * 3 * 4             # dW_o + d(ctx_V)                             = 48
    train_tok = enc_tok + decode + dec_bwd + enc_bwd + u_bwd + qkv_bwd + state_bwd + w_o_bwd
    assert train_tok == 1592
    # per step: bias fold, g * U, Adam over 908 parameters, decoder norms (with penalties)
    n_params = 256 + 256 + (32 + 8) + 32 * 4 + 8 * 7 + 3 * 4 + 32 * 4 + 32
    assert n_params == 908
    step_train = 6 * 8 * 32 + 4 * 32 * 4 + 13 * 908 + 16 * 32 * 8
    assert step_train == 17948

    assert O.flops_per_token(cfg, train=False) == enc_tok
    assert O.flops_per_token(cfg, train=True) == train_tok
    assert O.flops_per_token(cfg, train=False, n_tokens=10) == enc_tok + (2 * 8 * 32 + 32 * 4) / 10
    assert O.flops_per_token(cfg, train=True, n_tokens=10) == pytest.approx(train_tok + step_train / 10)
    tok, step = O.flop_breakdown(cfg, "forward")
    assert sum(tok.values()) == enc_tok + decode
    # the baselines at the same size
    topk = SAEConfig.build(D, F, "topk", k=K)
    relu = SAEConfig.build(D, F, "relu")
    assert O.flops_per_token(topk, train=False) == 512
    assert O.flops_per_token(topk, train=True) == 512 + 32 + 64 + 32
    assert O.flops_per_token(relu, train=True) == 512 + 512 + 64 + 1024 + 128 + 512  # dense decode and backward


def test_flops_do_not_depend_on_window_and_vanish_without_context():
    base = O.flops_per_token(small_trsae(), train=True)
    for w in (1, 5, 64):
        assert O.flops_per_token(small_trsae(window=w), train=True) == base
    no_ctx = small_trsae(window=0, w_start=0, use_pos=False)
    topk = SAEConfig.build(D, F, "topk", k=K)
    assert O.flops_per_token(no_ctx, train=False) == O.flops_per_token(topk, train=False)
    assert O.flops_per_token(small_trsae(d_v=4), train=False) == 1200 - 24 - (3 * 2 * 4 + 2 * 2 * 4) + \
        (3 * 2 * 5 + 2 * 2 * 5) + 2 * 8 * 1  # no W_o; V = 4


def _counted(cfg: SAEConfig, train: bool, n_tokens: int) -> int:
    sae = make_sae(cfg)
    x_BTD = torch.randn(2, n_tokens // 2, cfg.d_in, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
        if train:
            sae(x_BTD).loss.backward()
        else:
            with torch.no_grad():
                sae.encode(x_BTD)
    return fc.get_total_flops()


def test_flops_match_torch_flop_counter_on_dense_products():
    """FlopCounterMode counts mm / addmm / bmm (not embedding_bag, sparse mm, in-place addmm_ or elementwise
    work), so it must equal the counter's components that the code runs as such products."""
    n = 10
    topk = SAEConfig.build(D, F, "topk", k=K)
    tok, step = O.flop_breakdown(topk, "encode")
    assert _counted(topk, False, n) == n * tok["encoder"] + step["bias_fold"]
    cfg = small_trsae()
    tok, step = O.flop_breakdown(cfg, "encode")
    dense = tok["encoder"] + tok["context_qkv"] + tok["context_out"] + tok["context_query"]
    assert _counted(cfg, False, n) == n * dense + step["bias_fold"]
    relu = SAEConfig.build(D, F, "relu")
    tok, step = O.flop_breakdown(relu, "train")
    dense = tok["encoder"] + tok["decoder"] + tok["decoder_bwd"] + tok["encoder_bwd"]
    assert _counted(relu, True, n) == n * dense + step["bias_fold"]


def test_flop_breakdown_rejects_unknown_mode():
    with pytest.raises(ValueError):
        O.flop_breakdown(small_trsae(), "backward")


# ------------------------------------------------------------------------------------------ parameters

CONFIGS = [
    SAEConfig.build(D, F, "topk", k=K),
    SAEConfig.build(D, F, "batchtopk", k=K),
    SAEConfig.build(D, F, "relu"),
    small_trsae(),
    small_trsae(d_v=4),
    small_trsae(use_pos=False),
    small_trsae(use_attn=False),
    small_trsae(use_gates=False),
    small_trsae(per_token_gates=True),
    small_trsae(sparsity="relu"),
]


def _every_part():
    """One config per registered encoder × sparsity (with a predicting TRSAE), so that a new part is counted too."""
    from trsae.saes.config import part_names

    out = []
    for enc in part_names("encoder"):
        for sp in part_names("sparsity"):
            out.append(SAEConfig.build(D, F, sp, enc, **({} if sp == "relu" else {"k": K})))
    return out + [SAEConfig.build(D, F, "topk", "trsae", k=K, pred_k=2)]


@pytest.mark.parametrize("cfg", _every_part(), ids=lambda c: c.label)
def test_every_parts_encode_flops_match_torch_flop_counter(cfg):
    """Each registered encoder × sparsity declares its own FLOPs: its encode, run under FlopCounterMode on 2
    sequences of T tokens, counts exactly the declared dense products (`DENSE_PRODUCTS`) and the bias fold. A part
    that computes a product it does not declare, or declares one it does not compute, fails here."""
    from trsae.overhead.flops import DENSE_PRODUCTS

    T = 6
    tok, step = O.flop_breakdown(cfg, "encode", ctx_len=T)
    assert _counted(cfg, False, 2 * T) == 2 * T * sum(tok.get(key, 0) for key in DENSE_PRODUCTS) + step["bias_fold"]
    assert O.flops_per_token(cfg, train=True, n_tokens=2 * T, ctx_len=T) > O.flops_per_token(cfg, False, ctx_len=T)


def test_parts_whose_cost_grows_with_the_sequence_or_the_step_ask_for_it():
    tfa = SAEConfig.build(D, F, "topk", "tfa", k=K)
    with pytest.raises(ValueError, match="ctx_len"):
        O.flop_breakdown(tfa, "encode")
    assert O.flop_breakdown(tfa, "encode", ctx_len=64)[0]["tfa_scores"] == 2 * 64 * 4 * 16  # 2 T H d_head
    tsae = SAEConfig.build(D, F, "matryoshka", "tsae", k=K)
    assert O.flop_breakdown(tsae, "encode")[0] == O.flop_breakdown(SAEConfig.build(D, F, "matryoshka", k=K), "encode")[0]
    with pytest.raises(ValueError, match="n_tokens"):
        O.flop_breakdown(tsae, "train")
    H = tsae.encoder.n_high(F)
    assert O.flop_breakdown(tsae, "train", n_tokens=10)[1]["contrastive"] == 6 * 10 ** 2 * H


@pytest.mark.parametrize("cfg", CONFIGS + _every_part(), ids=lambda c: c.label)
def test_param_count_matches_module(cfg):
    sae = make_sae(cfg)
    counts = O.param_count(cfg)
    assert counts["total"] == sum(p.numel() for p in sae.parameters())
    assert counts["total"] == sum(v for key, v in counts.items() if key != "total")
    named = {n.split(".")[-1]: p for n, p in sae.named_parameters()}
    assert counts["encoder"] == named["W_enc"].numel() and counts["decoder"] == named["W_dec"].numel()
    if "U" in named:
        assert counts["U"] == named["U"].numel() and counts["attn_qkv"] == named["W_qkv"].numel()
    if "P" in named:
        assert counts["P"] == named["P"].numel()


def test_make_config_and_static_rows():
    assert O.make_config("trsae", 64, 256, 8, window=0).encoder.w_start == 0
    rows = O.static_rows(widths_mult=(2, 4), d_in=64, k=8)
    assert [(r["arch"], r["width_mult"]) for r in rows] == [(a, m) for m in (2, 4) for a in O.ARCH_NAMES]
    for r in rows:
        if r["arch"] in ("topk", "batchtopk"):
            assert r["flops_train_ratio"] == 1.0 and r["params_ratio"] == 1.0
        if r["arch"] == "trsae":
            assert r["flops_train_ratio"] > 1.0 and r["params"] > 2 * 64 * r["width"]


# ------------------------------------------------------------------------------------------ memory


def test_profiled_peak_bytes_follows_allocations_and_frees():
    def fn():
        a = torch.empty(1_000_000, dtype=torch.float32)   # 4 MB
        b = torch.empty(2_000_000, dtype=torch.float32)   # 8 MB  -> 12 MB live
        del a
        c = torch.empty(500_000, dtype=torch.float32)     # 2 MB  -> 10 MB live
        del b, c

    assert O.profiled_peak_bytes(fn) == 12_000_000


def test_peak_memory_counts_static_and_dense_preactivations():
    cfg = SAEConfig.build(16, 256, "topk", k=4)
    sae = make_sae(cfg)
    B, T = 2, 32
    enc = O.peak_memory(sae, B, T, train=False)
    n_params = sum(p.numel() for p in sae.parameters())
    static = 4 * n_params + 4 * B * T * 16 + B * T  # float32 parameters, inputs, bool mask
    assert enc.method == "tensors" and enc.static_mib * 2**20 == static
    # encode holds the dense pre-activations and the dense codes [N, F] at once
    assert enc.peak_mib * 2**20 >= static + 2 * 4 * B * T * 256
    train = O.peak_memory(sae, B, T, train=True)
    n_tensors = len(list(sae.parameters()))
    assert train.static_mib * 2**20 == static + 2 * 4 * n_params + 4 * n_tensors  # + Adam's moments and steps
    assert train.peak_mib * 2**20 >= train.static_mib * 2**20 + 4 * n_params  # + the gradients


# ------------------------------------------------------------------------------------------ the grid


def test_grid_cases_default_plan():
    cases = O.grid_cases()
    assert len(cases) == len(set(cases)) == 31
    assert O.grid_centre(O.WIDTHS_MULT, O.WINDOWS, O.CTX_LENS) == (8, 16, 128)
    trsae = [c for c in cases if c.arch == "trsae"]
    assert len(trsae) == 10 and all(c.window is not None for c in trsae)
    # every TRSAE case has every baseline at its (F, T)
    for c in trsae:
        for a in ("topk", "batchtopk", "relu"):
            assert O.Case(a, c.width_mult, None, c.ctx_len) in cases
    full = O.grid_cases(full=True)
    assert len(full) == 4 * 4 * 3 + 4 * 4 * 4
    assert O.grid_cases(archs=["trsae"], widths_mult=(2,), windows=(4,), ctx_lens=(8,)) == [
        O.Case("topk", 2, None, 8), O.Case("trsae", 2, 4, 8)]
    with pytest.raises(ValueError):
        O.grid_cases(archs=["gated"])


def test_overhead_grid_rows_tables_figure_macros(tmp_path):
    widths, windows, ctx_lens = (2, 4), (1, 4), (8, 16)
    rows = O.overhead_grid(widths_mult=widths, windows=windows, ctx_lens=ctx_lens, d_in=16, k=4, repeats=2,
                           batch=2, threads=1)
    assert len(rows) == len(O.grid_cases(widths_mult=widths, windows=windows, ctx_lens=ctx_lens))
    for r in rows:
        assert len(r["train_times"]) == len(r["encode_times"]) == 2
        assert r["tokens"] == 2 * r["ctx_len"] and r["width"] == 16 * r["width_mult"]
        assert r["train_s"] > 0 and r["peak_train_mib"] > 0 and r["peak_encode_mib"] > 0
        if r["arch"] == "topk":
            assert r["train_ratio"] == r["encode_ratio"] == r["peak_train_ratio"] == 1.0
        cfg = O.make_config(r["arch"], 16, r["width"], 4, r["window"] or 0)
        assert r["params"] == O.param_count(cfg)["total"]
        assert r["flops_train"] == O.flops_per_token(cfg, True, r["tokens"])
    centre = O.grid_centre(widths, windows, ctx_lens)
    summary = O.summarize_grid(rows, centre)
    assert summary["window_lo"] == 1 and summary["window_hi"] == 4
    assert {"trsae_train_ratio", "trsae_t_exponent_train", "trsae_f_exponent_train",
            "trsae_mem_per_token_ratio"} <= set(summary)
    assert summary["window_mem_ratio"] == 1.0  # the attention state does not depend on w
    m = R.overhead_macros(summary, centre, 16, 4)
    assert all(re.fullmatch(r"overhead[A-Z][A-Za-z]*", name) for name in m)
    R.write_macro_file(m, R.OVERHEAD, tmp_path)
    paths = R.write_tables(rows, tmp_path / "overhead_table")
    assert sorted(p.name for p in paths.values()) == ["overhead_table.csv", "overhead_table.md",
                                                       "overhead_table.tex"]
    assert len(paths["csv"].read_text().splitlines()) == len(rows) + 1
    assert R.overhead_figure(rows, centre, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_summarize_exponents_and_paired_ratios_on_synthetic_rows():
    """Times exactly linear in T and quadratic in F give exponents 1 and 2; paired ratios use the rounds."""
    cases = O.grid_cases(archs=["trsae"], widths_mult=(2, 4), windows=(4, 16), ctx_lens=(64, 128),
                         centre=(2, 16, 64))
    cfgs = {c: O.make_config(c.arch, 8, 8 * c.width_mult, 2, c.window or 0) for c in cases}
    times = {}
    for c in cases:
        base = c.ctx_len * c.width_mult**2 * (1.5 if c.arch == "trsae" else 1.0)
        if c.window == 4:
            base /= 1.2
        times[c] = {"train": [base, 2 * base, 3 * base], "encode": [base, base, base]}
    rows = _rows(cases, cfgs, times, {}, batch=1)
    s = O.summarize_grid(rows, (2, 16, 64))
    assert s["trsae_train_ratio"] == pytest.approx(1.5)
    assert s["window_train_ratio"] == pytest.approx(1.2)
    assert s["trsae_t_exponent_train"] == pytest.approx(1.0)
    assert s["topk_f_exponent_train"] == pytest.approx(2.0)
    assert math.isnan(O.scaling_exponent([1], [1]))


def test_time_step_and_rss_method_shapes():
    sae = make_sae(SAEConfig.build(16, 64, "topk", k=4))
    t = O.time_step(sae, B=2, T=8, train=True, repeats=3)
    assert len(t.times_s) == 3 and t.tokens == 16 and t.median_s > 0 and t.tok_s > 0
    assert len(O.time_step(sae, B=2, T=8, train=False, repeats=2).times_s) == 2
    rss = O.peak_memory(make_sae(small_trsae()), B=2, T=8, train=True, method="rss")
    assert rss.method == "rss" and rss.peak_mib >= 0
    with pytest.raises(ValueError):
        O.peak_memory(sae, 2, 8, train=False, method="tracemalloc")


def test_timings_run_the_trainers_own_step(monkeypatch):
    """The harness times `trsae.train.train_step` itself (in train mode), not a copy of it."""
    import trsae.train
    from trsae.overhead import measure

    assert measure.train_step is trsae.train.train_step
    calls = []

    def counting(sae, *args, **kw):
        calls.append(sae.training)
        return trsae.train.train_step(sae, *args, **kw)

    monkeypatch.setattr(measure, "train_step", counting)
    sae = make_sae(SAEConfig.build(16, 64, "topk", k=4))
    O.time_step(sae, B=2, T=8, train=False, repeats=1)  # leaves the SAE in eval mode
    O.time_step(sae, B=2, T=8, train=True, repeats=2, warmup=1)
    assert calls == [True, True, True]
