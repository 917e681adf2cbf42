"""One process per folder, with real processes: a second `harvest` or `train` into a folder that a live process is
writing is refused at once, naming that process; a lock left by a process killed with SIGKILL does not block the
rerun; and the library functions the notebooks call (`harvest`, `train_sae`) take the same lock."""

import os
import signal
import subprocess
import sys
import time

import pytest

from trsae.config import HarvestConfig, TrainConfig
from trsae.io import LOCK_FILE, FolderBusyError, folder_lock
from trsae.saes import SAEConfig
from trsae.store import harvest
from trsae.train import train_sae

TRAIN = ["train", "--sparsity", "topk", "--width", "64", "--k", "4", "--batch-size", "4", "--crop-len", "32",
         "--log-every", "1", "--quiet"]
HARVEST = ["harvest", "--model", "tiny-gpt2", "--layer", "1", "--data", "brown", "--ctx-len", "32",
           "--seqs-per-shard", "8", "--batch-size", "2", "--quiet"]


def _cmd(args):
    return [sys.executable, "-m", "trsae", *map(str, args)]


def _env():
    return os.environ.copy() | {"OMP_NUM_THREADS": "1"}


def _wait_for(cond, proc, what, timeout=120):
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, f"the first process ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


def _refused(args, holder, folder):
    r = subprocess.run(_cmd(args), capture_output=True, text=True, env=_env(), timeout=300)
    assert holder.poll() is None, "the first process ended before the second was refused; lengthen it"
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert f"process {holder.pid}" in lines[0] and str(folder) in lines[0], lines[0]
    return lines[0]


def test_a_second_train_is_refused_and_a_killed_ones_lock_is_not(tiny_store, tmp_path):
    run = tmp_path / "run"
    args = TRAIN + ["--tokens", "2000000", "--store", tiny_store.path, "--out", run]
    first = subprocess.Popen(_cmd(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size, first,
                  "its first training step")
        _refused(args, first, run)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (run / LOCK_FILE).exists()  # left behind by the killed process, but no longer held
    r = subprocess.run(_cmd(args + ["--max-steps", "2"]), capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (run / LOCK_FILE).exists() and (run / "checkpoint.pt").exists()


def test_a_second_harvest_is_refused(tmp_path):
    out = tmp_path / "store"
    args = HARVEST + ["--tokens", "400000", "--out", out]
    first = subprocess.Popen(_cmd(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(lambda: (out / LOCK_FILE).exists(), first, "it took the lock")
        _refused(args, first, out)
    finally:
        first.kill()
        first.wait()


def _hold(folder):
    """A separate process holding ``folder``'s lock until killed."""
    code = ("import sys, time\nfrom trsae.io import folder_lock\nwith folder_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(300)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=_env())
    assert p.stdout.readline().strip() == "held"
    return p


def test_the_library_functions_take_the_lock(tiny_store, tiny_model, tmp_path):
    run, out = tmp_path / "run", tmp_path / "store"
    sae_cfg = SAEConfig.build(tiny_store.d_model, 64, "topk", "token", k=4)
    train_cfg = TrainConfig(tokens=4 * 32 * 3, batch_size=4, crop_len=32)
    harvest_cfg = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=8 * 32, ctx_len=32,
                                seqs_per_shard=8, batch_size=4, val_frac=0.25, test_frac=0.25)
    holders = [_hold(run), _hold(out)]
    try:
        with pytest.raises(FolderBusyError, match=f"process {holders[0].pid}"):
            train_sae(sae_cfg, train_cfg, tiny_store, run, progress=False)
        with pytest.raises(FolderBusyError, match=f"process {holders[1].pid}"):
            harvest(harvest_cfg, out, model=tiny_model, progress=False)
        assert not (run / "run.json").exists() and not (out / "manifest.json").exists()
    finally:
        for p in holders:
            p.kill()
            p.wait()
    train_sae(sae_cfg, train_cfg, tiny_store, run, progress=False)  # the killed holders' locks do not block
    assert (run / "sae" / "config.json").exists()
    assert harvest(harvest_cfg, out, model=tiny_model, progress=False).manifest["complete"]


def test_the_lock_is_reentrant_within_a_process_and_released(tmp_path):
    with folder_lock(tmp_path / "f"):
        with folder_lock(tmp_path / "f"):
            pass
        assert (tmp_path / "f" / LOCK_FILE).exists()
    assert not (tmp_path / "f" / LOCK_FILE).exists()
    with pytest.raises(NotADirectoryError, match="is a file"):
        (tmp_path / "afile").write_text("x")
        with folder_lock(tmp_path / "afile"):
            pass
