"""Computational overhead of the SAEs: parameters, FLOPs, tokens/s and peak memory, side by side.

Pure torch + numpy (+ matplotlib's Agg canvas for the figure). Shapes: B sequences of T tokens, N = B T,
D = d_in, F = width, k active latents per token, K = d_k, V = d_v, C = d_ctx, Bk = n_buckets.

**FLOP model** (`flop_breakdown`). A FLOP is a multiply or an add: a matrix product of m multiply-adds counts
2m. What is counted is what `trsae.saes` / `trsae.temporal` actually run, per token:

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
  `trsae.saes._PairPreacts`): decoder 4kD (dW_dec rows and d(codes)), encoder 2kD (dW_enc; dL/dx is never
  formed), U 4kC; the context path gets a dense backward 2D(2K+V) (dW_qkv only) + 9K(V+1) + 4VC.
  ReLU is dense: decoder 4FD, L1 4F, encoder 2DF; a ReLU-sparsity TRSAE adds 4(C+Bk)F (2 Bk F without
  attention). So a TopK train step is ~1x its forward in FLOPs and a ReLU step ~2.5x.

Per step (not per token) come the bias fold ``b_enc - b_dec @ W_enc`` (2DF forward, 6DF train), ``g * U``
(FC, 4FC train) and, in training, Adam (`ADAM_FLOPS_PER_PARAM` per parameter) and the decoder-norm work of
``remove_parallel_grad_`` + ``normalize_decoder_`` (+ the norm-weighted penalties), ~11FD (+5FD): these two
are approximate elementwise counts. `flops_per_token(..., n_tokens=N)` spreads them over the N tokens.

**Timing** (`time_step`, `overhead_grid`): a training step is forward + backward + ``remove_parallel_grad_``
+ Adam + ``normalize_decoder_`` on a fixed random batch with BOS masked (what a trainer does, as in
`benchmarks/bench_temporal.py`); inference is eval-mode ``encode`` under no_grad. In the grid every case
runs once per round, in a fresh random order each round, after one warm-up step; ratios to TopK at the same
(F, T) are medians over rounds of the per-round (paired) ratios, so drifts of a shared machine cancel.

**Peak memory** (`peak_memory`): by default the peak of live torch tensor bytes during one steady-state step
(the CPU analogue of ``torch.cuda.max_memory_allocated``): the bytes that exist before the step (parameters,
buffers, inputs, and in training Adam's state; gradients are set to None first, because the profiler cannot
see frees of blocks allocated before it started, and are counted as backward makes them) plus the maximum
of the running sum of the allocation / free events that ``torch.profiler`` (``profile_memory=True``) records
during the step. It is in-process, exact and repeatable (the same bytes under torch 2.11 and 2.13), and not
blurred by the allocator's caching, lazily loaded kernel libraries or the interpreter, which all enter a
peak RSS (tracemalloc does not see torch's allocations at all). Allocations inside intra-op worker threads
and scratch memory of oneDNN / BLAS are not seen. ``method="rss"`` instead measures the peak RSS increase
(VmHWM) of a fresh subprocess, as `benchmarks/bench_temporal.py` does (a cross-check; about 2x larger).
On CUDA, ``torch.cuda.max_memory_allocated`` minus what was allocated before the step, plus the static bytes.
The peak is a maximum over the phases of a step: for small batches it falls in the parameter update
(gradients, Adam temporaries: O(F D)), for large ones in the forward (dense ``[N, F]`` pre-activations and
codes), so memory is affine in T only once activations dominate; `summarize` reports the marginal
KiB per token between the two longest contexts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch

from trsae.io import atomic_write_bytes
from trsae.saes import SAE, SAEConfig, make_sae
from trsae.temporal import TRSAEConfig

ARCH_NAMES = ("topk", "batchtopk", "relu", "trsae")
"""Architectures of the grid; "trsae" is a TopK-sparsity TRSAE (matched to the TopK baseline)."""
REFERENCE = "topk"
WIDTHS_MULT = (2, 4, 8, 16)
WINDOWS = (1, 4, 16, 64)
CTX_LENS = (64, 128, 256, 512)
ADAM_FLOPS_PER_PARAM = 13
"""torch Adam per parameter: lerp (3) + mul/addcmul (4) + sqrt/div/add (3) + addcdiv (3), elementwise."""
_MIB = 2.0**20


# --------------------------------------------------------------------------------------------- configs


def make_config(arch: str, d_in: int, width: int, k: int = 32, window: int = 16, seed: int = 0,
                **trsae_kw: Any) -> SAEConfig:
    """Config of one grid architecture: a baseline (`window` ignored) or a TopK TRSAE with `trsae_kw`."""
    if arch == "trsae":
        trsae_kw.setdefault("w_start", min(1, window))
        return TRSAEConfig(d_in=d_in, width=width, k=k, window=window, seed=seed, **trsae_kw)
    return SAEConfig(arch=arch, d_in=d_in, width=width, k=k, seed=seed)


def _is_trsae(cfg: SAEConfig) -> bool:
    return isinstance(cfg, TRSAEConfig)


def _attn_on(cfg: SAEConfig) -> bool:
    return _is_trsae(cfg) and cfg.use_attn and cfg.window > 0


def param_count(cfg: SAEConfig) -> dict[str, int]:
    """Trainable parameters by component (as `make_sae(cfg)` creates them) and their "total"."""
    D, F = cfg.d_in, cfg.width
    out = {"encoder": D * F, "decoder": F * D, "biases": F + D}
    if _is_trsae(cfg):
        K, V, C = cfg.d_k, cfg.d_v, cfg.d_ctx
        if cfg.use_pos:
            out["P"] = F * cfg.n_buckets
        if cfg.use_attn:
            out["attn_qkv"] = D * (2 * K + V)
            if V != C:
                out["attn_out"] = V * C
            out["U"] = F * C
            if cfg.use_gates:
                out["gates"] = F + (F * K if cfg.per_token_gates else 0)
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------- FLOPs


def flop_breakdown(cfg: SAEConfig, mode: str) -> tuple[dict[str, float], dict[str, float]]:
    """(per-token FLOPs, per-step FLOPs) by component for `mode` "encode" (eval `encode`, what inference
    timings measure), "forward" (encode + decode + losses) or "train" (forward + backward + optimiser).
    See the module docstring for the model."""
    if mode not in ("encode", "forward", "train"):
        raise ValueError(f"mode must be 'encode', 'forward' or 'train', got {mode!r}")
    D, F, k = cfg.d_in, cfg.width, cfg.k
    dense = cfg.mechanism == "relu"
    tok: dict[str, float] = {"encoder": 2 * D * F}
    step: dict[str, float] = {"bias_fold": 2 * D * F}
    trsae, attn = _is_trsae(cfg), _attn_on(cfg)
    K, V, C = (cfg.d_k, cfg.d_v, cfg.d_ctx) if trsae else (0, 0, 0)
    pos = trsae and cfg.use_pos
    tok_gates = attn and cfg.use_gates and cfg.per_token_gates
    if attn:
        tok["context_qkv"] = 2 * D * (2 * K + V)
        tok["context_state"] = 3 * K * (V + 1)
        tok["context_query"] = 2 * K * (V + 1)
        if V != C:
            tok["context_out"] = 2 * V * C
        tok["context_U"] = 2 * C * F
        if tok_gates:
            tok["gates"] = 2 * K * F
        elif cfg.use_gates:
            step["gate_fold"] = F * C
    if pos:
        tok["position"] = 2 * cfg.n_buckets * F
    if mode == "encode":
        return tok, step
    tok["decoder"] = 2 * F * D if dense else 2 * k * D
    if dense:
        tok["l1"] = 2 * F
    if mode == "forward":
        return tok, step
    # backward
    step["bias_fold"] = 6 * D * F
    if "gate_fold" in step:
        step["gate_fold"] = 4 * F * C
    if dense:
        tok["decoder_bwd"] = 4 * F * D
        tok["l1_bwd"] = 4 * F
        tok["encoder_bwd"] = 2 * D * F
        if attn or pos:
            tok["context_U_bwd"] = 4 * ((C if attn else 0) + (cfg.n_buckets if pos else 0)) * F
            if not attn:
                tok["context_U_bwd"] //= 2  # one-hot input: only dP
            if tok_gates:
                tok["gates_bwd"] = 4 * K * F
    else:
        tok["decoder_bwd"] = 4 * k * D
        tok["encoder_bwd"] = 2 * k * D
        if attn:
            tok["context_U_bwd"] = 4 * k * C
            if tok_gates:
                tok["gates_bwd"] = 4 * k * (K + C)
    if attn:
        tok["context_qkv_bwd"] = 2 * D * (2 * K + V)
        tok["context_state_bwd"] = 9 * K * (V + 1)
        if V != C:
            tok["context_out_bwd"] = 4 * V * C
    step["optimizer"] = ADAM_FLOPS_PER_PARAM * param_count(cfg)["total"]
    penalties = dense or (trsae and (pos or (cfg.use_attn and cfg.use_gates)))
    step["decoder_norm"] = (11 + (5 if penalties else 0)) * F * D
    return tok, step


def flops_per_token(cfg: SAEConfig, train: bool, n_tokens: int | None = None) -> float:
    """FLOPs per token of a training step (`train`) or of inference `encode`; with `n_tokens` (tokens per
    step) the per-step work (bias fold, Adam, decoder norms) is spread over them, else it is left out."""
    tok, step = flop_breakdown(cfg, "train" if train else "encode")
    return float(sum(tok.values()) + (sum(step.values()) / n_tokens if n_tokens else 0.0))


# --------------------------------------------------------------------------------------------- steps


def environment() -> dict[str, Any]:
    """Versions, device, threads and the machine's load (timings on a shared machine are noisy)."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpu": cpu,
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def make_batch(B: int, T: int, d_in: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_BTD standard normal, mask_BT with position 0 masked as BOS)."""
    gen = torch.Generator().manual_seed(seed)
    x_BTD = torch.randn(B, T, d_in, generator=gen).to(device)
    mask_BT = torch.ones(B, T, dtype=torch.bool, device=device)
    mask_BT[:, 0] = False
    return x_BTD, mask_BT


def make_optimizer(sae: SAE) -> torch.optim.Optimizer:
    return torch.optim.Adam(sae.parameters(), lr=1e-4)


def train_step(sae: SAE, opt: torch.optim.Optimizer, x_BTD: torch.Tensor, mask_BT: torch.Tensor) -> None:
    """What a trainer does per batch: forward, backward, projected decoder gradient, Adam, unit decoder rows."""
    out = sae.train()(x_BTD, mask_BT)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.remove_parallel_grad_()
    opt.step()
    sae.normalize_decoder_()


@torch.no_grad()
def encode_step(sae: SAE, x_BTD: torch.Tensor, mask_BT: torch.Tensor) -> None:
    sae.eval().encode(x_BTD, mask_BT=mask_BT)


def _step_fn(sae: SAE, opt: torch.optim.Optimizer | None, x_BTD, mask_BT, train: bool) -> Callable[[], None]:
    if train:
        return lambda: train_step(sae, opt, x_BTD, mask_BT)
    return lambda: encode_step(sae, x_BTD, mask_BT)


def _timed(fn: Callable[[], None], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class Timing(NamedTuple):
    median_s: float
    times_s: list[float]
    tokens: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.median_s


def time_step(sae: SAE, B: int, T: int, train: bool, repeats: int = 5, warmup: int = 1,
              opt: torch.optim.Optimizer | None = None, seed: int = 0) -> Timing:
    """Seconds per training step (`train`) or per eval `encode` of a random ``[B, T, d_in]`` batch, after
    `warmup` untimed steps; median of `repeats`. Compare SAEs with `overhead_grid`, which interleaves them."""
    dev = sae.W_dec.device
    x_BTD, mask_BT = make_batch(B, T, sae.cfg.d_in, seed, str(dev))
    opt = opt if opt is not None or not train else make_optimizer(sae)
    fn = _step_fn(sae, opt, x_BTD, mask_BT, train)
    for _ in range(warmup):
        fn()
    times = [_timed(fn, dev.type == "cuda") for _ in range(repeats)]
    return Timing(statistics.median(times), times, B * T)


# --------------------------------------------------------------------------------------------- memory


def _tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _static_tensors(sae: SAE, opt, inputs, train: bool) -> list[torch.Tensor]:
    out = [*sae.parameters(), *sae.buffers(), *inputs]
    if train:  # gradients are None here (see peak_memory)
        out += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


@contextlib.contextmanager
def _quiet_native_output():
    """Send file descriptors 1 and 2 to /dev/null: the profiler writes start/stop lines there natively
    (no log level turns them off), and a notebook captures them."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def profiled_peak_bytes(fn: Callable[[], None]) -> int:
    """Largest running sum of CPU tensor allocations minus frees while `fn` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    if not events:
        raise RuntimeError("torch.profiler recorded no memory events")
    deltas = np.array([e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())], dtype=np.int64)
    return int(max(0, deltas.cumsum().max()))


class PeakMemory(NamedTuple):
    peak_mib: float
    static_mib: float
    method: str


def peak_memory(sae: SAE, B: int, T: int, train: bool, opt: torch.optim.Optimizer | None = None,
                method: str = "tensors", seed: int = 0) -> PeakMemory:
    """Peak memory of one steady-state training step or eval `encode` (see the module docstring):
    method "tensors" (profiler, in-process; CUDA: max_memory_allocated) or "rss" (subprocess, CPU)."""
    if method == "rss":
        return PeakMemory(_rss_peak_mib(sae.cfg, B, T, train, seed), float("nan"), "rss")
    if method != "tensors":
        raise ValueError(f"method must be 'tensors' or 'rss', got {method!r}")
    dev = sae.W_dec.device
    x_BTD, mask_BT = make_batch(B, T, sae.cfg.d_in, seed, str(dev))
    if train and opt is None:
        opt = make_optimizer(sae)
    fn = _step_fn(sae, opt, x_BTD, mask_BT, train)
    fn()  # steady state: Adam state and the BatchTopK threshold exist
    if train:  # the profiler cannot see frees of blocks allocated before it started: let backward make them
        opt.zero_grad(set_to_none=True)
    static = _tensor_bytes(_static_tensors(sae, opt, (x_BTD, mask_BT), train))
    if dev.type == "cuda":  # everything else on the device (other models) is subtracted
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated(dev) - before
        return PeakMemory((static + transient) / _MIB, static / _MIB, "cuda_allocated")
    return PeakMemory((static + profiled_peak_bytes(fn)) / _MIB, static / _MIB, "tensors")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _rss_child(spec_json: str) -> None:
    """Subprocess body of `peak_memory(method="rss")`: prints the peak RSS increase in MiB."""
    spec = json.loads(spec_json)
    cfg_cls = TRSAEConfig if spec["config"].get("arch") == "trsae" else SAEConfig
    x_BTD, mask_BT = make_batch(spec["B"], spec["T"], spec["config"]["d_in"], spec["seed"])
    (x_BTD[0, :2] @ x_BTD[0, :2].T).sum()  # load the BLAS kernels before the baseline
    before = _status_kib("VmRSS")
    sae = make_sae(cfg_cls.from_dict(spec["config"]))
    opt = make_optimizer(sae)
    fn = _step_fn(sae, opt, x_BTD, mask_BT, spec["train"])
    for _ in range(2):
        fn()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def _rss_peak_mib(cfg: SAEConfig, B: int, T: int, train: bool, seed: int) -> float:
    spec = json.dumps({"config": cfg.to_dict(), "B": B, "T": T, "train": train, "seed": seed})
    code = "import sys; from trsae.overhead import _rss_child; _rss_child(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


# --------------------------------------------------------------------------------------------- the grid


class Case(NamedTuple):
    arch: str
    width_mult: int
    window: int | None  # None for the baselines
    ctx_len: int


def _centre(values: Sequence[int], preferred: int) -> int:
    return preferred if preferred in values else sorted(values)[len(values) // 2]


def grid_centre(widths_mult: Sequence[int], windows: Sequence[int], ctx_lens: Sequence[int]) -> tuple[int, int, int]:
    """(F / d, w, T) that the one-factor-at-a-time sweeps go through: 8, 16, 128 when present, else the
    (upper) median of each list."""
    return _centre(widths_mult, 8), _centre(windows, 16), _centre(ctx_lens, 128)


def grid_cases(archs: Sequence[str] = ARCH_NAMES, widths_mult: Sequence[int] = WIDTHS_MULT,
               windows: Sequence[int] = WINDOWS, ctx_lens: Sequence[int] = CTX_LENS,
               centre: tuple[int, int, int] | None = None, full: bool = False) -> list[Case]:
    """Cases to measure. `full`: every (arch, F, T) and every w for the TRSAE. Otherwise three sweeps through
    `centre` (F0, w0, T0): F with (w0, T0), T with (F0, w0), w with (F0, T0); the baselines (no w) run at
    every (F, T) the TRSAE does, so each TRSAE case has its reference. TopK is always included."""
    archs = list(dict.fromkeys([REFERENCE, *archs]))
    for a in archs:
        if a not in ARCH_NAMES:
            raise ValueError(f"unknown arch {a!r}: expected one of {ARCH_NAMES}")
    F0, w0, T0 = centre or grid_centre(widths_mult, windows, ctx_lens)
    if full:
        trsae_cells = [(m, w, T) for m in widths_mult for T in ctx_lens for w in windows]
    else:
        trsae_cells = [(m, w0, T0) for m in widths_mult] + [(F0, w0, T) for T in ctx_lens] + \
                      [(F0, w, T0) for w in windows]
    trsae_cells = list(dict.fromkeys(trsae_cells))
    ft = list(dict.fromkeys((m, T) for m, _, T in trsae_cells))
    cases = [Case(a, m, None, T) for m, T in ft for a in archs if a != "trsae"]
    if "trsae" in archs:
        cases += [Case("trsae", m, w, T) for m, w, T in trsae_cells]
    return cases


def overhead_grid(archs: Sequence[str] = ARCH_NAMES, widths_mult: Sequence[int] = WIDTHS_MULT,
                  windows: Sequence[int] = WINDOWS, ctx_lens: Sequence[int] = CTX_LENS, d_in: int = 640,
                  k: int = 32, repeats: int = 5, batch: int = 8, centre: tuple[int, int, int] | None = None,
                  full: bool = False, memory: bool = True, device: str = "cpu", seed: int = 0,
                  trsae_kw: dict[str, Any] | None = None, threads: int | None = None,
                  log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every `grid_cases` case: train and encode time (one warm-up, then `repeats` rounds, each case
    once per round in a random order), peak memory, parameters and FLOPs. Batches are `batch` sequences of T
    tokens (so time should grow linearly with T). One model per (arch, F), shared across T and w (the
    TRSAE's window is set per case). Returns one row per case; ``*_ratio`` = median over rounds of the
    case's time / TopK's time at the same (F, T) (memory and FLOPs: plain ratios). `threads`: torch intra-op
    threads for the measurement (default: leave as is)."""
    if threads is None:
        return _grid(archs, widths_mult, windows, ctx_lens, d_in, k, repeats, batch, centre, full, memory, device,
                     seed, trsae_kw, log)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _grid(archs, widths_mult, windows, ctx_lens, d_in, k, repeats, batch, centre, full, memory, device,
                     seed, trsae_kw, log)
    finally:
        torch.set_num_threads(before)


def _grid(archs, widths_mult, windows, ctx_lens, d_in, k, repeats, batch, centre, full, memory, device, seed,
          trsae_kw, log) -> list[dict[str, Any]]:
    trsae_kw = dict(trsae_kw or {})
    cases = grid_cases(archs, widths_mult, windows, ctx_lens, centre, full)
    cuda = torch.device(device).type == "cuda"
    say = log or (lambda s: None)
    models: dict[tuple[str, int], tuple[SAE, torch.optim.Optimizer]] = {}
    batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    cfgs: dict[Case, SAEConfig] = {}
    for c in cases:
        cfg = make_config(c.arch, d_in, c.width_mult * d_in, k, c.window or 0, seed, **trsae_kw)
        cfgs[c] = cfg
        if (c.arch, c.width_mult) not in models:
            sae = make_sae(dataclasses.replace(cfg, window=max(windows)) if c.arch == "trsae" else cfg).to(device)
            models[(c.arch, c.width_mult)] = (sae, make_optimizer(sae))
        if c.ctx_len not in batches:
            batches[c.ctx_len] = make_batch(batch, c.ctx_len, d_in, seed, device)

    def fn(c: Case, train: bool) -> Callable[[], None]:
        sae, opt = models[(c.arch, c.width_mult)]
        if c.window is not None:
            sae.set_window(c.window)
        return _step_fn(sae, opt, *batches[c.ctx_len], train)

    say(f"{len(cases)} cases, {len(models)} models; warm-up")
    for c in cases:
        for train in (True, False):
            fn(c, train)()
    times = {c: {"train": [], "encode": []} for c in cases}
    rng = random.Random(seed)
    for r in range(repeats):
        t0 = time.perf_counter()
        for c in rng.sample(cases, len(cases)):
            for train in (True, False):
                step = fn(c, train)
                times[c]["train" if train else "encode"].append(_timed(step, cuda))
        say(f"round {r + 1}/{repeats}: {time.perf_counter() - t0:.1f} s")
    mem: dict[Case, dict[str, float]] = {}
    if memory:
        for c in cases:
            sae, opt = models[(c.arch, c.width_mult)]
            if c.window is not None:
                sae.set_window(c.window)
            mem[c] = {}
            for m in ("train", "encode"):
                pm = peak_memory(sae, batch, c.ctx_len, m == "train", opt, seed=seed)
                mem[c][m], mem[c][m + "_static"] = pm.peak_mib, pm.static_mib
        say("memory done")
    return _rows(cases, cfgs, times, mem, batch, torch.get_num_threads())


def _rows(cases, cfgs, times, mem, batch, threads=None) -> list[dict[str, Any]]:
    rows = []
    for c in cases:
        cfg, n = cfgs[c], batch * c.ctx_len
        ref = Case(REFERENCE, c.width_mult, None, c.ctx_len)
        row: dict[str, Any] = {**c._asdict(), "width": cfg.width, "batch": batch, "tokens": n,
                               "threads": threads,
                               "params": param_count(cfg)["total"],
                               "flops_train": flops_per_token(cfg, True, n),
                               "flops_encode": flops_per_token(cfg, False, n)}
        for mode in ("train", "encode"):
            ts, rs = times[c][mode], times[ref][mode]
            med = statistics.median(ts)
            row[f"{mode}_s"] = med
            row[f"{mode}_min_s"] = min(ts)  # stalls of a shared machine only add time: min is a floor
            row[f"{mode}_tok_s"] = n / med
            row[f"{mode}_gflop_s"] = row[f"flops_{mode}"] * n / med / 1e9
            row[f"{mode}_ratio"] = statistics.median(a / b for a, b in zip(ts, rs))
            row[f"{mode}_times"] = list(ts)
            if mem:
                row[f"peak_{mode}_mib"] = mem[c][mode]
                row[f"static_{mode}_mib"] = mem[c][mode + "_static"]  # parameters, inputs (+ Adam state)
                row[f"peak_{mode}_ratio"] = mem[c][mode] / mem[ref][mode]
        rows.append(row)
    ref_rows = {(r["width_mult"], r["ctx_len"]): r for r in rows if r["arch"] == REFERENCE}
    for r in rows:
        ref = ref_rows[(r["width_mult"], r["ctx_len"])]
        r["flops_train_ratio"] = r["flops_train"] / ref["flops_train"]
        r["flops_encode_ratio"] = r["flops_encode"] / ref["flops_encode"]
        r["params_ratio"] = r["params"] / ref["params"]
    return rows


# --------------------------------------------------------------------------------------------- summaries


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


def scaling_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (1 = linear)."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def _find(rows, **kw) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _paired_ratio(a: dict[str, Any], b: dict[str, Any], mode: str) -> float:
    return statistics.median(x / y for x, y in zip(a[f"{mode}_times"], b[f"{mode}_times"]))


def summarize(rows: list[dict[str, Any]], centre: tuple[int, int, int]) -> dict[str, float]:
    """Headline numbers at `centre` (F0, w0, T0): time ratios to TopK per arch, TRSAE window ratio
    (largest w over w = 4, or over the smallest w; paired per round), scaling exponents of time (and of
    TRSAE memory) in T and F, and memory / FLOP / parameter ratios. Missing cases are left out."""
    F0, w0, T0 = centre
    out: dict[str, float] = {}
    at = {"width_mult": F0, "ctx_len": T0}
    for r in rows:
        if r["width_mult"] == F0 and r["ctx_len"] == T0 and r["window"] in (None, w0) and r["arch"] != REFERENCE:
            for mode in ("train", "encode"):
                out[f"{r['arch']}_{mode}_ratio"] = r[f"{mode}_ratio"]
            if "peak_train_ratio" in r:
                out[f"{r['arch']}_mem_ratio"] = r["peak_train_ratio"]
            if r["arch"] == "trsae":
                out["trsae_flops_train_ratio"] = r["flops_train_ratio"]
                out["trsae_params_ratio"] = r["params_ratio"]
    ws = sorted({r["window"] for r in rows if r["arch"] == "trsae" and r["width_mult"] == F0 and r["ctx_len"] == T0})
    if len(ws) >= 2:
        lo, hi = (4 if 4 in ws and ws[-1] != 4 else ws[0]), ws[-1]
        a, b = _find(rows, arch="trsae", window=hi, **at), _find(rows, arch="trsae", window=lo, **at)
        out.update(window_lo=lo, window_hi=hi, window_train_ratio=_paired_ratio(a, b, "train"),
                   window_encode_ratio=_paired_ratio(a, b, "encode"))
        if "peak_train_mib" in a:
            out["window_mem_ratio"] = a["peak_train_mib"] / b["peak_train_mib"]
    for arch in ARCH_NAMES:
        w = w0 if arch == "trsae" else None
        sweep_t = sorted((r["ctx_len"], r) for r in rows if r["arch"] == arch and r["width_mult"] == F0
                         and r["window"] == w)
        sweep_f = sorted((r["width_mult"], r) for r in rows if r["arch"] == arch and r["ctx_len"] == T0
                         and r["window"] == w)
        for name, sweep in (("t", sweep_t), ("f", sweep_f)):
            if len(sweep) >= 2:
                xs = [x for x, _ in sweep]
                out[f"{arch}_{name}_exponent_train"] = scaling_exponent(xs, [r["train_s"] for _, r in sweep])
                out[f"{arch}_{name}_exponent_encode"] = scaling_exponent(xs, [r["encode_s"] for _, r in sweep])
                if "peak_train_mib" in sweep[0][1]:
                    out[f"{arch}_{name}_exponent_mem"] = scaling_exponent(xs, [r["peak_train_mib"] for _, r in sweep])
        if len(sweep_t) >= 2 and "peak_train_mib" in sweep_t[0][1]:  # marginal memory of the longest contexts
            (_, a), (_, b) = sweep_t[-2:]
            d_mib = b["peak_train_mib"] - a["peak_train_mib"]
            out[f"{arch}_mem_kib_per_token"] = d_mib * 1024 / (b["tokens"] - a["tokens"])
    if "trsae_mem_kib_per_token" in out and "topk_mem_kib_per_token" in out:
        out["trsae_mem_per_token_ratio"] = out["trsae_mem_kib_per_token"] / out["topk_mem_kib_per_token"]
    return out


def macros(summary: dict[str, float], centre: tuple[int, int, int], d_in: int, k: int) -> dict[str, float | int]:
    """Paper macros (letters-only names, prefix ``overhead``) from `summarize`'s output."""
    from trsae.report import macro_name

    F0, w0, T0 = centre
    out: dict[str, float | int] = {"overheadDIn": d_in, "overheadK": k, "overheadWidthMult": F0,
                                   "overheadWindow": w0, "overheadCtxLen": T0}
    names = {"trsae_train_ratio": "TrainRatio", "trsae_encode_ratio": "EncodeRatio", "trsae_mem_ratio": "MemRatio",
             "trsae_flops_train_ratio": "FlopRatio", "trsae_params_ratio": "ParamRatio",
             "batchtopk_train_ratio": "BatchtopkTrainRatio", "relu_train_ratio": "ReluTrainRatio",
             "window_lo": "WindowLo", "window_hi": "WindowHi", "window_train_ratio": "WindowTrainRatio",
             "window_encode_ratio": "WindowEncodeRatio", "window_mem_ratio": "WindowMemRatio",
             "trsae_t_exponent_train": "TExponent", "topk_t_exponent_train": "TExponentTopk",
             "trsae_t_exponent_mem": "TExponentMem", "trsae_mem_kib_per_token": "MemPerTokenKiB",
             "trsae_mem_per_token_ratio": "MemPerTokenRatio",
             "trsae_f_exponent_train": "FExponent",
             "topk_f_exponent_train": "FExponentTopk"}
    for key, name in names.items():
        if key in summary and math.isfinite(summary[key]):
            out[macro_name("overhead", name)] = summary[key]
    return out


# --------------------------------------------------------------------------------------------- tables and figure

TABLE_COLUMNS: list[tuple[str, str, str]] = [
    ("arch", "arch", "s"), ("width_mult", "F/d", "d"), ("window", "w", "d"), ("ctx_len", "T", "d"),
    ("params", "params", ",d"), ("flops_train", "MFLOP/tok train", ".3g"),
    ("train_tok_s", "train tok/s", ".0f"), ("train_ratio", "train ×TopK", ".2f"),
    ("encode_tok_s", "encode tok/s", ".0f"), ("encode_ratio", "encode ×TopK", ".2f"),
    ("train_gflop_s", "train GFLOP/s", ".1f"), ("peak_train_mib", "peak MiB train", ".0f"),
    ("peak_train_ratio", "mem ×TopK", ".2f"), ("peak_encode_mib", "peak MiB encode", ".0f"),
]


STATIC_COLUMNS: list[tuple[str, str, str]] = [
    ("arch", "arch", "s"), ("width_mult", "F/d", "d"), ("width", "F", "d"), ("params", "params", ",d"),
    ("params_ratio", "params ×TopK", ".3f"), ("mflops_train", "MFLOP/tok train", ".4g"),
    ("flops_train_ratio", "train ×TopK", ".3f"), ("mflops_encode", "MFLOP/tok encode", ".4g"),
    ("flops_encode_ratio", "encode ×TopK", ".3f"),
]


def flop_table(cfg: SAEConfig, n_tokens: int | None = None) -> str:
    """Text table of `flop_breakdown` per token (encode and train), with the per-step work per token
    when `n_tokens` is given."""
    lines = [f"{'component':18s}{'encode':>12s}{'train':>12s}   (FLOPs per token)"]
    enc, enc_step = flop_breakdown(cfg, "encode")
    tr, tr_step = flop_breakdown(cfg, "train")
    for key in tr:
        lines.append(f"{key:18s}{enc.get(key, 0):12,.0f}{tr[key]:12,.0f}")
    for key in tr_step if n_tokens else ():
        lines.append(f"{key + ' (step)':18s}{enc_step.get(key, 0) / n_tokens:12,.0f}{tr_step[key] / n_tokens:12,.0f}")
    total_enc, total_tr = flops_per_token(cfg, False, n_tokens), flops_per_token(cfg, True, n_tokens)
    lines.append(f"{'total':18s}{total_enc:12,.0f}{total_tr:12,.0f}")
    return "\n".join(lines)


def save_results(path: str | os.PathLike, rows: list[dict[str, Any]], summary: dict[str, float],
                 **extra: Any) -> Path:
    """Rows, summary and anything else (environment, parameters) as JSON, atomically."""
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    obj = {**extra, "summary": {k: clean(v) for k, v in summary.items()},
           "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}
    return _write_atomic(Path(path), json.dumps(obj, indent=1) + "\n")


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "n/a"
    return format(v, spec)


def format_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS,
                 style: str = "text") -> str:
    """`rows` as aligned text, "md" or "tex" (columns missing from the rows are dropped).
    MFLOP columns: values are divided by 1e6 when the key is ``flops_*``."""
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    cells = [[_fmt(r.get(key) / 1e6 if key.startswith("flops_") and "ratio" not in key else r.get(key), spec)
              for key, _, spec in cols] for r in rows]
    heads = [h for _, h, _ in cols]
    if style == "md":
        rule = "|".join("---" if key == "arch" else "---:" for key, *_ in cols)
        lines = ["| " + " | ".join(heads) + " |", "|" + rule + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"
    if style == "tex":
        esc = lambda s: s.replace("×", r"$\times$").replace("%", r"\%").replace("_", r"\_").replace("–", "--")
        lines = [r"\begin{tabular}{" + "".join("l" if key == "arch" else "r" for key, *_ in cols) + "}", r"\hline",
                 " & ".join(esc(h) for h in heads) + r" \\", r"\hline"]
        lines += [" & ".join(esc(x) for x in c) + r" \\" for c in cells]
        return "\n".join(lines + [r"\hline", r"\end{tabular}"]) + "\n"
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    out = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    out += ["  ".join(x.rjust(w) for x, w in zip(c, widths)) for c in cells]
    return "\n".join(out) + "\n"


def _write_atomic(path: Path, data: str | bytes) -> Path:
    return atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def write_tables(rows: list[dict[str, Any]], stem: str | os.PathLike) -> dict[str, Path]:
    """``<stem>.md`` and ``.tex`` (formatted `TABLE_COLUMNS`) and ``.csv`` (every scalar field, full precision)."""
    stem = Path(stem)
    keys = [k for k in rows[0] if not isinstance(rows[0][k], list)]
    buf = io.StringIO()
    buf.write(",".join(keys) + "\n")
    for r in rows:
        buf.write(",".join("" if r.get(k) is None else repr(r[k]) if isinstance(r[k], float) else str(r[k])
                           for k in keys) + "\n")
    return {"md": _write_atomic(stem.with_suffix(".md"), format_table(rows, style="md")),
            "tex": _write_atomic(stem.with_suffix(".tex"), format_table(rows, style="tex")),
            "csv": _write_atomic(stem.with_suffix(".csv"), buf.getvalue())}


_COLORS = {"topk": "#4C72B0", "batchtopk": "#DD8452", "relu": "#55A868", "trsae": "#C44E52"}


def overhead_figure(rows: list[dict[str, Any]], centre: tuple[int, int, int], path: str | os.PathLike) -> Path:
    """Log-log panels: train step time, encode time and peak train memory (rows) against F, w and T (columns)
    through `centre`. Dashed: time predicted from the FLOP count, scaled to pass through each arch's
    measurement at the centre (so the gap shows where time does not follow FLOPs). Saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:.3g}")

    F0, w0, T0 = centre
    have_mem = "peak_train_mib" in rows[0]
    quantities = [("train_s", "flops_train", "train step (s)"), ("encode_s", "flops_encode", "encode (s)")]
    if have_mem:
        quantities.append(("peak_train_mib", None, "peak train memory (MiB)"))
    fig = Figure(figsize=(12, 3.2 * len(quantities)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(quantities), 3, squeeze=False)
    axes_spec = [("width_mult", "F / d", {"ctx_len": T0}),
                 ("window", "window w", {"width_mult": F0, "ctx_len": T0}),
                 ("ctx_len", "context length T", {"width_mult": F0})]
    for i, (qkey, fkey, qlabel) in enumerate(quantities):
        for j, (xkey, xlabel, fixed) in enumerate(axes_spec):
            ax = axes[i][j]
            for arch in ARCH_NAMES:
                pts = sorted((r[xkey], r) for r in rows if r["arch"] == arch
                             and all(r[k] == v for k, v in fixed.items())
                             and (xkey == "window" or r["window"] in (None, w0)))
                if not pts:
                    continue
                centre_row = _find(rows, arch=arch, width_mult=F0, ctx_len=T0,
                                   window=w0 if arch == "trsae" else None)
                if xkey == "window" and arch != "trsae":
                    ax.axhline(pts[0][1][qkey], color=_COLORS[arch], lw=1, alpha=0.7, label=arch)
                    continue
                xs, ys = [x for x, _ in pts], [r[qkey] for _, r in pts]
                ax.plot(xs, ys, "o-", color=_COLORS[arch], label=arch, ms=4)
                if fkey and centre_row is not None:
                    scale = centre_row[qkey] / (centre_row[fkey] * centre_row["tokens"])
                    ax.plot(xs, [r[fkey] * r["tokens"] * scale for _, r in pts], "--", color=_COLORS[arch], lw=1,
                            alpha=0.7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(plain)
            ax.yaxis.set_major_formatter(plain)
            lo, hi = ax.get_ylim()  # label minor ticks only where no decade tick is in view
            ax.yaxis.set_minor_formatter(plain if hi / lo < 20 else FuncFormatter(lambda v, _: ""))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(qlabel)
            ax.grid(alpha=0.3, which="both")
            if i == 0 and j == 0:
                ax.legend(fontsize=7, title="solid: measured\ndashed: ∝ FLOPs", title_fontsize=7)
    fig.suptitle(f"Overhead (d={rows[0]['width'] // rows[0]['width_mult']}, B={rows[0]['batch']}; "
                 f"sweeps through F={F0}d, w={w0}, T={T0})", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return _write_atomic(Path(path), buf.getvalue())
