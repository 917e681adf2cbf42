"""Measuring a step of an SAE: time, peak memory. Pure torch + numpy.

**Timing** (`time_step`): a training step is `trsae.train.train_step`, the trainer's own step (forward +
backward + ``remove_parallel_grad_`` + Adam + ``normalize_decoder_``), on a fixed random batch with BOS masked;
inference is eval-mode ``encode`` under no_grad. Time is the median over repeats after warm-up steps (the grid,
`trsae.overhead.grid`, interleaves the SAEs instead).

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
codes).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch

from trsae.overhead.flops import config_from_dict
from trsae.saes import SAE, SAEConfig, make_sae
from trsae.train import train_step

_MIB = 2.0**20


def machine() -> dict[str, Any]:
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


@torch.no_grad()
def encode_step(sae: SAE, x_BTD: torch.Tensor, mask_BT: torch.Tensor) -> None:
    sae.eval().encode(x_BTD, mask_BT=mask_BT)


def step_fn(sae: SAE, opt: torch.optim.Optimizer | None, x_BTD, mask_BT, train: bool) -> Callable[[], None]:
    """The step to time: `trsae.train.train_step` in train mode (`train`), else `encode_step`."""
    if train:
        return lambda: train_step(sae.train(), opt, x_BTD, mask_BT)
    return lambda: encode_step(sae, x_BTD, mask_BT)


def timed(fn: Callable[[], None], cuda: bool) -> float:
    """Seconds ``fn()`` takes (the device synchronised before and after on CUDA)."""
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
    fn = step_fn(sae, opt, x_BTD, mask_BT, train)
    for _ in range(warmup):
        fn()
    times = [timed(fn, dev.type == "cuda") for _ in range(repeats)]
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
    fn = step_fn(sae, opt, x_BTD, mask_BT, train)
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
    x_BTD, mask_BT = make_batch(spec["B"], spec["T"], spec["config"]["d_in"], spec["seed"])
    (x_BTD[0, :2] @ x_BTD[0, :2].T).sum()  # load the BLAS kernels before the baseline
    before = _status_kib("VmRSS")
    sae = make_sae(config_from_dict(spec["config"]))
    opt = make_optimizer(sae)
    fn = step_fn(sae, opt, x_BTD, mask_BT, spec["train"])
    for _ in range(2):
        fn()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def _rss_peak_mib(cfg: SAEConfig, B: int, T: int, train: bool, seed: int) -> float:
    spec = json.dumps({"config": cfg.to_dict(), "B": B, "T": T, "train": train, "seed": seed})
    code = "import sys; from trsae.overhead.measure import _rss_child; _rss_child(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
