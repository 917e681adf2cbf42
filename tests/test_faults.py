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


def _kill_randomly(args, done, rng, max_kills=4, window=(1.0, 8.0)):
    """Start the command and SIGKILL it after a random delay, until ``done()``; return the number of kills."""
    kills = 0
    while not done() and kills < max_kills:
        p = _cli(args)
        time.sleep(rng.uniform(*window))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        else:
            assert p.returncode == 0, p.stderr.read()
    return kills


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

    def done():
        if (out / "manifest.json").exists():
            _readable_state(out)
            return json.loads((out / "manifest.json").read_text())["complete"]
        return False

    kills = _kill_randomly(HARVEST + ["--out", str(out)], done, rng)
    assert _cli(HARVEST + ["--out", str(out)]).wait() == 0
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["norm_scale"] == b["norm_scale"]
    assert kills >= 1, "no kill landed while the harvest ran"


@pytest.mark.slow
def test_training_survives_random_kills(tmp_path):
    store = tmp_path / "store"
    assert _cli(HARVEST + ["--out", str(store)]).wait() == 0
    train = ["train", "--store", str(store), "--arch", "topk", "--width", "256", "--k", "8", "--tokens", "80000",
             "--batch-size", "8", "--window-len", "32", "--checkpoint-every", "10", "--quiet"]
    assert _cli(train + ["--out", str(tmp_path / "ref")]).wait() == 0
    out = tmp_path / "killed"
    kills = _kill_randomly(train + ["--out", str(out)], lambda: (out / "sae" / "config.json").exists(),
                           random.Random(1), window=(3.0, 9.0))
    assert _cli(train + ["--out", str(out)]).wait() == 0
    from trsae.saes import load_sae

    ref_sd, got_sd = load_sae(tmp_path / "ref" / "sae").state_dict(), load_sae(out / "sae").state_dict()
    for k, v in ref_sd.items():
        assert torch.equal(v, got_sd[k]), k
    assert kills >= 1, "no kill landed while training ran"
