"""Train an SAE on an activation store: Adam with warm-up and decay, dead-latent tracking, a metrics log,
and atomic checkpoints from which a killed run resumes to the same weights.

A run folder holds::

    checkpoint.pt      model, optimiser, scheduler, RNG states, data cursor (step), dead-latent counters (steps
                       since each latent last fired)
    metrics.jsonl      one line per logged step
    sae/               the finished SAE (config.json + sae.safetensors), written last
    run.json           the run's format (`RUN_FORMAT`), configs and the store it trained on

Rerunning the same call resumes from ``checkpoint.pt``; a finished run returns its SAE at once. One process
writes a run folder at a time (`trsae.io.folder_lock`); SIGTERM or Ctrl-C checkpoints the last step and stops.

Under ``torchrun --nproc-per-node N -m trsae train ...`` (``gloo`` on CPU, ``nccl`` on GPU) each rank takes
every N-th training crop of the same global batch, gradients are averaged over ranks, the dead-latent counters and
BatchTopK's threshold are reduced so that every rank holds the same values, and only rank 0 writes the log,
checkpoints and the SAE. The data cursor counts global batches, so a run resumes on any number of ranks.
BatchTopK selects its top k·N activations within each rank's share of the batch.

On a GPU (`TrainConfig.device`, `trsae.device`) the SAE, its optimiser and the batches live there, optionally
under bfloat16 autocast (`TrainConfig.amp`); checkpoints load onto any device.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trsae.config import TrainConfig, given, train_identity
from trsae.device import amp_dtype, autocast, resolve, to_device
from trsae.dist import Ranks
from trsae.saes import SAE, ForwardOutput, SAEConfig, load_sae, make_sae
from trsae.io import atomic_write_bytes, atomic_write_json, deferred_signals, folder_lock
from trsae.store import ActivationStore
from trsae.timing import phase

RUN_FORMAT = 2
"""run.json's ``format``: 2 since the SAE redesign (its ``sae`` is a format-2 SAE config). A run.json without one
is format 1 when its SAE config names an ``arch`` (the code before the redesign), else 2."""


class RunError(RuntimeError):
    """A run folder does not match the requested training (another store, SAE or schedule), or is damaged."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped training after a checkpoint of its last step; rerunning resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def lr_lambda(step: int, total: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up over ``warmup_frac`` of the steps, constant, then linear decay to 0 over ``decay_frac``."""
    warm = int(total * warmup_frac)
    decay_start = total - int(total * decay_frac)
    if step < warm:
        return (step + 1) / warm
    if step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_step(sae: SAE, opt: torch.optim.Optimizer, x_BTD: torch.Tensor, mask_BT: torch.Tensor,
               pos_BT: torch.Tensor | None = None, dead_F: torch.Tensor | None = None,
               ranks: Ranks | None = None, ctx_BT: torch.Tensor | None = None,
               amp: torch.dtype | None = None) -> ForwardOutput:
    """One optimiser step, the same for the trainer, the overhead timings and the benchmarks: forward (with the
    AuxK loss over `dead_F`; under `torch.autocast` in ``amp`` when given), backward, gradients averaged over
    `ranks`, the decoder gradient made orthogonal to unit-norm rows, Adam, decoder rows renormalised (in training
    mode). Returns the forward's output (loss terms, codes)."""
    unit_norm = sae.sparsity.unit_norm
    sae.train()
    with autocast(x_BTD.device, amp):
        out = sae(x_BTD, mask_BT=mask_BT, pos_BT=pos_BT, dead_F=dead_F, ctx_BT=ctx_BT)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if ranks is not None:
        ranks.average_grads_(sae)
    if unit_norm:
        sae.remove_parallel_grad_()
    opt.step()
    if unit_norm:
        sae.normalize_decoder_()
    return out


def _margin(sae: SAE, cfg: TrainConfig) -> int:
    """The left margin of the training crops: `TrainConfig.context` for an encoder that reads context, else none
    (a per-token SAE would only spend time encoding it)."""
    return cfg.context if sae.encoder.reads_context else 0


@torch.no_grad()
def init_b_dec_(sae: SAE, store: ActivationStore, cfg: TrainConfig, n_batches: int = 8) -> None:
    """Start ``b_dec`` at the mean of the training activations (from the first ``n_batches`` of the stream).

    Residual streams carry a large shared component (on Gemma 3 270M layer 6 the variance around the mean is
    a small part of E‖x‖²); starting at the mean lets the dictionary spend its latents on the rest.
    """
    total, n = torch.zeros(store.d_model, dtype=torch.float64), 0
    for i, b in enumerate(store.batches("train", batch_size=cfg.batch_size, crop_len=cfg.crop_len,
                                        shuffle=cfg.shuffle, seed=cfg.seed)):
        if i >= n_batches:
            break
        rows = b.acts_BTD[b.mask_BT].double()
        total += rows.sum(0)
        n += rows.shape[0]
    sae.b_dec.copy_((total / max(n, 1)).to(sae.b_dec.dtype))


@torch.no_grad()
def calibrate_(sae: SAE, store: ActivationStore, cfg: TrainConfig, n_batches: int = 8) -> None:
    """Hand a sparsity that asks for it (`Sparsity.calibrated`, e.g. BatchTopK's inference threshold) the final
    model's pre-activations on ``n_batches`` training batches (a stream of its own seed)."""
    zs = []
    for i, b in enumerate(store.batches("train", batch_size=cfg.batch_size, crop_len=cfg.crop_len,
                                        shuffle=cfg.shuffle, seed=cfg.seed + 1, context=_margin(sae, cfg))):
        if i >= n_batches:
            break
        b = to_device(b, sae.W_dec.device)
        z_BTF = sae.pre_acts(b.acts_BTD, pos_BT=b.pos_BT, mask_BT=b.mask_BT, ctx_BT=b.ctx_BT)
        zs.append(z_BTF[b.mask_BT].flatten())
    sae.sparsity.calibrate_(torch.cat(zs), sae.cfg.width)


def train_sae(sae_cfg: SAEConfig, cfg: TrainConfig, store: ActivationStore, out: str | os.PathLike,
              progress: bool = True, max_steps: int | None = None) -> SAE:
    """Train (or resume, or reload) the SAE of run folder ``out``, on `TrainConfig.device` (the SAE comes back on the
    CPU, as a finished run's loads).

    ``max_steps`` stops after that many steps of this call with a checkpoint (as if killed), for tests. Another
    process writing ``out`` meanwhile makes this raise `trsae.io.FolderBusyError` at once; SIGTERM or SIGINT
    during the steps checkpoints the last one and raises `TrainingInterrupted`.
    """
    out = Path(out)
    ranks = Ranks.current()
    if cfg.batch_size % ranks.world:
        raise RunError(f"batch_size {cfg.batch_size} (the global batch) must be a multiple of the "
                       f"{ranks.world} processes")
    if sae_cfg.d_in != store.d_model:
        raise RunError(f"SAE d_in {sae_cfg.d_in} does not match the store's d_model {store.d_model}")
    if store.ctx_len % cfg.crop_len:
        raise RunError(f"crop_len {cfg.crop_len} must divide the store's context length {store.ctx_len}")
    if cfg.context > store.ctx_len - cfg.crop_len:
        raise RunError(f"context {cfg.context} leaves no room for the crop: at most the store's context length "
                       f"{store.ctx_len} minus crop_len {cfg.crop_len}")
    device = resolve(cfg.device)  # a device that cannot run here is refused before the run folder is touched
    sae_cfg = dataclasses.replace(sae_cfg, input_scale=store.norm_scale, seed=cfg.seed)  # one seed: the run's
    run_info = {"format": RUN_FORMAT, "sae": sae_cfg.to_dict(), "train": train_identity(cfg),
                "store": {"path": str(store.path), "config_hash": store.manifest["config_hash"],
                          "model": store.manifest["model"], "layer": store.layer, "site": store.site}}
    lock = folder_lock(out) if ranks.main else nullcontext()  # rank 0 speaks for its job
    with lock, phase("train", sae_cfg.label):
        return _train(sae_cfg, cfg, store, out, run_info, ranks, device, progress, max_steps)


def _open_run(out: Path, run_info: dict, ranks: Ranks) -> Path:
    """Check that ``out`` holds this run or none (writing its run.json), drop damaged log lines; the log's path."""
    out.mkdir(parents=True, exist_ok=True)
    old = read_run_info(out)
    if old is not None:
        for key in ("sae", "train"):
            if old[key] != run_info[key]:
                raise RunError(f"{out} holds a run with another {key} configuration; use another folder or "
                               f"delete it (was {old[key]}, now {run_info[key]})")
        if old["store"]["config_hash"] != run_info["store"]["config_hash"]:
            raise RunError(f"{out} was trained on another store ({old['store']}); use another folder")
    elif ranks.main:
        atomic_write_json(out / "run.json", run_info)
    log_path = out / "metrics.jsonl"
    if log_path.exists() and ranks.main:
        _drop_damaged_log_lines(log_path)
    ranks.barrier()
    return log_path


@torch.no_grad()
def _count_firing_(sae: SAE, codes_MF: torch.Tensor, since_fired_F: torch.Tensor, ranks: Ranks) -> None:
    """One step of the dead-latent clocks (steps since each latent fired on any rank), and the sparsity's
    running buffers (BatchTopK's threshold) averaged over ranks."""
    fired = ranks.sum_((codes_MF > 0).any(0).long()) > 0
    since_fired_F += 1
    since_fired_F[fired] = 0
    if ranks.world > 1:
        for buf in sae.sparsity.buffers():
            ranks.sum_(buf).div_(ranks.world)


@torch.no_grad()
def _log_record(sae: SAE, out_: ForwardOutput, batch, codes_MF: torch.Tensor, since_fired_F: torch.Tensor,
                dead_steps: int, step: int, tokens_per_step: int, lr: float, tok_per_s: float) -> dict:
    """One line of metrics.jsonl: the step's loss terms, L0, FVU on its batch, dead latents, throughput."""
    x = batch.acts_BTD[batch.mask_BT]
    err = (out_.x_hat_BTD[batch.mask_BT] - x).pow(2).sum()
    fvu = (err / (x - x.mean(0)).pow(2).sum()).item()
    dead_F = since_fired_F >= dead_steps
    rec = {"step": step, "tokens": step * tokens_per_step, "lr": lr,
           "loss": out_.loss.item(), **{k: v.item() for k, v in out_.losses.items()},
           "l0": (codes_MF > 0).sum(-1).float().mean().item(), "fvu": fvu,
           "n_dead": int(dead_F.sum()), "dead_frac": dead_F.float().mean().item(), "tok_per_s": tok_per_s}
    rec.update(sae.encoder.log_stats())
    return rec


def _train(sae_cfg: SAEConfig, cfg: TrainConfig, store: ActivationStore, out: Path, run_info: dict, ranks: Ranks,
           device: torch.device, progress: bool, max_steps: int | None) -> SAE:
    log_path = _open_run(out, run_info, ranks)
    if (out / "sae" / "config.json").exists():
        return load_sae(out / "sae")

    tokens_per_step = cfg.batch_size * cfg.crop_len
    total = max(1, cfg.tokens // tokens_per_step)
    dead_steps = max(1, round(cfg.dead_window_frac * total))
    ckpt = out / "checkpoint.pt"
    amp = amp_dtype(cfg.amp)
    sae, opt, sched, since_fired_F, step = _resume(ckpt, sae_cfg, cfg, total, ranks, store.dtype, device)
    if log_path.exists() and ranks.main:  # drop log lines written after the checkpoint we resume from
        lines = [ln for ln, rec in _log_lines(log_path)[0] if rec["step"] <= step]
        atomic_write_bytes(log_path, "".join(ln + "\n" for ln in lines).encode())
    if step == 0:
        init_b_dec_(sae, store, cfg)
        if sae.sparsity.unit_norm:
            sae.normalize_decoder_()
    ranks.broadcast_params_(sae)

    def checkpoint() -> None:
        if not ranks.main:
            return
        _save_checkpoint(ckpt, {"model": sae.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "since_fired": since_fired_F, "step": step,
                                "rng": _rng_state(), "run": run_info})

    batches = store.batches("train", batch_size=cfg.batch_size, crop_len=cfg.crop_len, shuffle=cfg.shuffle,
                            seed=cfg.seed, start=step, context=_margin(sae, cfg))
    bar = tqdm(total=total, initial=step, desc=f"train {sae_cfg.label}", unit="step",
               disable=not (progress and ranks.main))
    stop_at = total if max_steps is None else min(total, step + max_steps)
    t0, tok0, saved = time.perf_counter(), 0, step
    sae.train()
    with open(log_path if ranks.main else os.devnull, "a") as log, deferred_signals() as stop:
        while step < stop_at and not _agreed(stop, ranks, device):
            batch = to_device(ranks.shard(next(batches)), device)
            sae.encoder.on_step(step, total)
            out_ = train_step(sae, opt, batch.acts_BTD, batch.mask_BT, batch.pos_BT,
                              dead_F=since_fired_F >= dead_steps, ranks=ranks, ctx_BT=batch.ctx_BT, amp=amp)
            sched.step()
            codes_MF = out_.codes_BTF[batch.mask_BT].detach()
            _count_firing_(sae, codes_MF, since_fired_F, ranks)
            step += 1
            tok0 += int(batch.mask_BT.sum())
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                rec = _log_record(sae, out_, batch, codes_MF, since_fired_F, dead_steps, step, tokens_per_step,
                                  sched.get_last_lr()[0], tok0 / (time.perf_counter() - t0))
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", l0=f"{rec['l0']:.1f}", fvu=f"{rec['fvu']:.3f}")
            if step % cfg.checkpoint_every == 0 or step == stop_at:
                checkpoint()
                saved = step
        stopped = _agreed(stop, ranks, device)
        if stopped and step != saved:
            checkpoint()
    bar.close()
    if stopped:
        name = signal.Signals(stop[0] if stop else signal.SIGTERM).name
        raise TrainingInterrupted(
            f"{name} after step {step} of {total}; checkpoint {ckpt} written: rerun the same command to resume"
            if step else f"{name} before the first step; rerun the same command to start", signal.Signals[name])
    sae.eval()
    if step >= total and sae.sparsity.calibrated:
        calibrate_(sae, store, cfg)
    if step >= total and ranks.main:
        sae.save(out / "sae")
    ranks.barrier()
    return sae.cpu()  # where a finished run's SAE loads (evaluation, pursuit and dashboards run on the CPU)


def _resume(ckpt: Path | None, sae_cfg: SAEConfig, cfg: TrainConfig, total: int, ranks: Ranks,
            dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu")):
    """(SAE, optimiser, scheduler, steps since each latent last fired, step): from ``ckpt`` if there is one, else
    new (in ``dtype``, the store's, initialised on the CPU and moved to ``device``). A checkpoint that cannot be
    read is set aside as ``*.corrupt`` with a warning, and training restarts."""
    torch.manual_seed(cfg.seed)
    sae = make_sae(sae_cfg, dtype).to(device)
    opt = torch.optim.Adam(sae.optim_groups(cfg.lr), lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, cfg.warmup_frac, cfg.decay_frac))
    if ckpt is None or not ckpt.exists():
        return sae, opt, sched, torch.zeros(sae_cfg.width, dtype=torch.long, device=device), 0
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # Adam's state follows its parameters
        sae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        return sae, opt, sched, state["since_fired"].to(device), state["step"]
    except FileNotFoundError:  # rank 0 set it aside meanwhile
        pass
    except PermissionError:
        raise
    except Exception as e:  # cut (torch raises OSError EINVAL or RuntimeError), overwritten, not a checkpoint
        if ranks.main:
            bad = ckpt.with_name(ckpt.name + ".corrupt")
            os.replace(ckpt, bad)
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"warning: checkpoint {ckpt} cannot be read ({why}); set aside as {bad.name}, training restarts "
                  "from step 0", file=sys.stderr, flush=True)
    return _resume(None, sae_cfg, cfg, total, ranks, dtype, device)  # a new run


def _agreed(stop: list[int], ranks: Ranks, device: torch.device = torch.device("cpu")) -> bool:
    """Whether any rank was asked to stop (all ranks then stop after the same step; the count travels on the
    training device, which NCCL needs)."""
    if ranks.world == 1:
        return bool(stop)
    return bool(ranks.sum_(torch.tensor([len(stop)], device=device)).item())


def read_run_info(out: str | os.PathLike) -> dict | None:
    """A run folder's ``run.json`` (None if it has none), refused when damaged or of a format this code cannot
    resume."""
    out = Path(out)
    p = out / "run.json"
    if not p.exists():
        return None
    try:
        info = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{p} is not valid JSON ({e}); delete the run folder {out} or train into another") from e
    if not isinstance(info, dict) or not {"sae", "train", "store"} <= set(info):
        raise RunError(f"{p} is not a run record (no sae, train or store); delete the run folder {out} or train "
                       "into another")
    version = info.get("format", 1 if isinstance(info["sae"], dict) and "arch" in info["sae"] else RUN_FORMAT)
    if version == 1:
        raise RunError(f"{out} holds a run of an older trsae (run format 1, before the SAE redesign), which this "
                       f"version cannot resume; train into another folder (its finished sae/ still loads)")
    if version != RUN_FORMAT:
        raise RunError(f"{p}: run format {version!r} is not one this code reads ({RUN_FORMAT}); a newer trsae "
                       "wrote it: use that version, or train into another folder")
    return info


def _log_lines(p: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """The (text, record) of each good line of a metrics log, and the numbers of its damaged lines."""
    good, bad = [], []
    for i, ln in enumerate(p.read_text(errors="replace").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            good.append((ln, rec))
        else:
            bad.append(i)
    return good, bad


def _drop_damaged_log_lines(p: Path) -> None:
    good, bad = _log_lines(p)
    if bad:
        atomic_write_bytes(p, "".join(ln + "\n" for ln, _ in good).encode())
        print(f"warning: {p} line(s) {', '.join(map(str, bad))} were not log records; dropped them", file=sys.stderr,
              flush=True)


def read_log(run: str | os.PathLike) -> list[dict]:
    """The metrics log of a run folder, one dict per logged step."""
    p = Path(run) / "metrics.jsonl"
    if not p.exists():
        return []
    good, bad = _log_lines(p)
    if bad:
        raise RunError(f"{p} line {bad[0]} is not a log record; rerun the train command that wrote it (which drops "
                       "damaged lines) or delete that line")
    return [rec for _, rec in good]


def sae_config_from_args(a, d_in: int) -> SAEConfig:
    """The SAE config of the CLI's ``--sparsity``, ``--encoder``, ``--width`` and the part settings given."""
    return SAEConfig.build(d_in, a.width or 8 * d_in, a.sparsity, a.encoder, **given(a, a.part_fields))


def train_from_args(a) -> None:
    store = ActivationStore(a.store)
    cfg = TrainConfig(crop_len=a.crop_len or min(store.ctx_len, TrainConfig.crop_len), **given(a, a.train_fields))
    sae = train_sae(sae_config_from_args(a, store.d_model), cfg, store, a.out, progress=not a.quiet,
                    max_steps=a.max_steps)
    if Ranks.current().rank != 0:
        return
    log = read_log(a.out)
    last = log[-1] if log else {}
    print(f"trained {type(sae).__name__} -> {Path(a.out) / 'sae'}: "
          + ", ".join(f"{k}={last[k]:.4g}" for k in ("step", "loss", "l0", "fvu", "dead_frac") if k in last))
