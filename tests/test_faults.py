"""Real process kills (SIGKILL at random moments) during harvest and training, then resume: the final store
and the final weights equal an uninterrupted run's, and no partial file is ever where a reader takes it."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

HARVEST = ["harvest", "--model", "tiny-gpt2", "--layer", "1", "--data", "brown", "--tokens", "12000",
           "--ctx-len", "32", "--seqs-per-shard", "8", "--batch-size", "2", "--quiet"]


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "trsae", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy(), **kw)


def _kill_randomly(args, progress, rng, max_kills=4):
    """Start the command and SIGKILL it at a random point of its progress, until it finishes; return the number
    of kills. ``progress()`` gives (units done, units in all), read from the files the command writes, so the
    kill lands mid-run on a fast machine as on a slow one (a wall-clock delay missed the whole run on a fast one).
    """
    kills = 0
    while kills < max_kills:
        done, total = progress()
        if total and done >= total:
            break
        p = _cli(args)
        lo = done + 1
        target = rng.randint(lo, max(lo, done + (total - done) * 3 // 5)) if total else 1
        while p.poll() is None:
            now, total = progress()
            if total and now >= target:
                time.sleep(rng.uniform(0.0, 0.02))  # a moment inside the next unit of work, not only at its edge
                break
            time.sleep(0.002)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        else:
            assert p.returncode == 0, p.stderr.read()
            break
    return kills


def _read_log(run):
    """Complete lines of a run's metrics log (a line being written when read is skipped)."""
    p = run / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for ln in p.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            pass
    return out


def _readable_state(folder):
    """Every file a reader would take (the manifest and the shards it lists) parses and matches."""
    from trsae.store import ActivationStore

    m = json.loads((folder / "manifest.json").read_text())
    store = ActivationStore(folder, allow_partial=True)
    for i in range(len(m["shards"])):
        store.shard(i)


@pytest.mark.slow
def test_harvest_survives_random_kills(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert _cli(HARVEST + ["--out", str(ref)]).wait() == 0
    rng = random.Random(0)

    n_shards = len(json.loads((ref / "manifest.json").read_text())["shards"])

    def progress():
        if not (out / "manifest.json").exists():
            return 0, n_shards
        _readable_state(out)
        m = json.loads((out / "manifest.json").read_text())
        return (n_shards if m["complete"] else min(len(m["shards"]), n_shards - 1)), n_shards

    kills = _kill_randomly(HARVEST + ["--out", str(out)], progress, rng)
    assert _cli(HARVEST + ["--out", str(out)]).wait() == 0
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["norm_scale"] == b["norm_scale"]
    assert kills >= 1, "no kill landed while the harvest ran"


@pytest.mark.slow
def test_training_survives_random_kills(tmp_path):
    store = tmp_path / "store"
    assert _cli(HARVEST + ["--out", str(store)]).wait() == 0
    train = ["train", "--store", str(store), "--sparsity", "topk", "--width", "256", "--k", "8", "--tokens", "80000",
             "--batch-size", "8", "--crop-len", "32", "--checkpoint-every", "10", "--quiet"]
    assert _cli(train + ["--out", str(tmp_path / "ref")]).wait() == 0
    out = tmp_path / "killed"
    n_steps = _read_log(tmp_path / "ref")[-1]["step"]

    def progress():
        if (out / "sae" / "config.json").exists():
            return n_steps, n_steps
        log = _read_log(out)
        return (log[-1]["step"] if log else 0), n_steps

    kills = _kill_randomly(train + ["--out", str(out)], progress, random.Random(1))
    assert _cli(train + ["--out", str(out)]).wait() == 0
    from trsae.saes import load_sae

    ref_sd, got_sd = load_sae(tmp_path / "ref" / "sae").state_dict(), load_sae(out / "sae").state_dict()
    for k, v in ref_sd.items():
        assert torch.equal(v, got_sd[k]), k
    assert kills >= 1, "no kill landed while training ran"



N_STEPS = 150


def _signal_train(store):
    return ["train", "--store", str(store.path), "--sparsity", "topk", "--width", "64", "--k", "4",
            "--tokens", str(N_STEPS * 4 * 32), "--batch-size", "4", "--crop-len", "32", "--log-every", "1",
            "--checkpoint-every", "100000", "--quiet"]


def _cli1(args):
    return subprocess.Popen([sys.executable, "-m", "trsae", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy() | {"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def uninterrupted(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("signal") / "ref"
    assert _cli1(_signal_train(tiny_store) + ["--out", str(out)]).wait() == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_training_checkpoints_its_last_step(tiny_store, uninterrupted, tmp_path, sig):
    """SIGTERM (a cluster's pre-emption) or SIGINT (Ctrl-C) mid-run: the process checkpoints the step it was on
    (checkpoint_every is far away, so no regular checkpoint exists), says so in one line and exits 128 + signal;
    the rerun goes on from that step and ends with bitwise the weights of an uninterrupted run."""
    train, out = _signal_train(tiny_store), tmp_path / "stopped"
    p = _cli1(train + ["--out", str(out)])
    while not _read_log(out) or _read_log(out)[-1]["step"] < 5:
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.002)
    p.send_signal(sig)
    assert p.wait(timeout=60) == 128 + sig, p.stderr.read()
    lines = [ln for ln in p.stderr.read().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"stopped: {sig.name} after step "), lines
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    last = _read_log(out)[-1]["step"]
    assert 5 <= state["step"] == last < N_STEPS, (state["step"], last)  # no step lost
    assert f"after step {last} of {N_STEPS}" in lines[0] and str(out / "checkpoint.pt") in lines[0]
    assert _cli1(train + ["--out", str(out)]).wait() == 0
    assert [r["step"] for r in _read_log(out)] == list(range(1, N_STEPS + 1))
    from trsae.saes import load_sae

    ref_sd, got_sd = load_sae(uninterrupted / "sae").state_dict(), load_sae(out / "sae").state_dict()
    for k, v in ref_sd.items():
        assert torch.equal(v, got_sd[k]), k
