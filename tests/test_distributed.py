"""torchrun data parallelism: 2 CPU processes (gloo) sharing a global batch reach the weights of 1 process
with that batch, and a run checkpointed on 2 ranks resumes on 1."""

import os
import subprocess
import sys

import pytest
import torch

from trsae.saes import load_sae

HARVEST = ["harvest", "--model", "tiny-gpt2", "--layer", "1", "--data", "brown", "--tokens", "6000",
           "--ctx-len", "32", "--seqs-per-shard", "16", "--batch-size", "4", "--quiet"]


def _run(args, nproc=1):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 \
        else [sys.executable]
    env = os.environ.copy() | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launch, "-m", "trsae", *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "store"
    _run(HARVEST + ["--out", str(out)])
    return out


def _train_args(store, out, arch="topk", extra=()):
    return ["train", "--store", str(store), "--sparsity", arch, "--width", "128", "--k", "4", "--tokens", "6144",
            "--batch-size", "8", "--crop-len", "32", "--checkpoint-every", "4", "--quiet", "--out", str(out),
            *extra]


def _assert_same_weights(a, b, atol=1e-4):
    sa, sb = load_sae(a / "sae").state_dict(), load_sae(b / "sae").state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=1e-3, msg=k)


@pytest.mark.slow
def test_two_processes_match_one(store, tmp_path):
    _run(_train_args(store, tmp_path / "one"))
    _run(_train_args(store, tmp_path / "two"), nproc=2)
    log = [ln for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if ln]
    assert len(log) >= 1  # rank 0 logged (and only once per step)
    assert len({ln for ln in log}) == len(log)
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    # a changed weight somewhere would show: the runs did train away from their common start
    w0 = load_sae(tmp_path / "one" / "sae").W_dec
    assert not torch.allclose(w0, torch.zeros_like(w0))


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_one(store, tmp_path):
    _run(_train_args(store, tmp_path / "ref"))
    _run(_train_args(store, tmp_path / "mixed", extra=["--max-steps", "8"]), nproc=2)
    assert not (tmp_path / "mixed" / "sae").exists()
    assert torch.load(tmp_path / "mixed" / "checkpoint.pt", weights_only=False)["step"] == 8
    _run(_train_args(store, tmp_path / "mixed"))
    _assert_same_weights(tmp_path / "ref", tmp_path / "mixed")


@pytest.mark.slow
def test_batchtopk_threshold_is_shared_by_ranks(store, tmp_path):
    _run(_train_args(store, tmp_path / "btk", arch="batchtopk"), nproc=2)
    sae = load_sae(tmp_path / "btk" / "sae")
    assert float(sae.sparsity.threshold) > 0


def _manifest(d):
    import json

    return json.loads((d / "manifest.json").read_text())


@pytest.mark.slow
def test_two_rank_harvest_builds_the_one_rank_store(store, tmp_path):
    _run(HARVEST + ["--out", str(tmp_path / "two")], nproc=2)
    a, b = _manifest(store), _manifest(tmp_path / "two")
    assert b["complete"] and len(b["shards"]) == len(a["shards"]) > 2
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["norm_scale"] == b["norm_scale"]
    assert not list((tmp_path / "two").glob("*.entry.json"))
    assert [s["rank"] for s in b["shards"]] == [i % 2 for i in range(len(b["shards"]))]  # the work was split


def test_harvest_resumes_from_shards_another_rank_left(tmp_path, tiny_model):
    """A killed 2-rank harvest leaves shard 0 listed and shard 2 (rank 0's next) finished but not yet listed;
    a 1-rank rerun lists it without recomputing it and fills the gap."""
    import json
    import shutil

    from trsae.config import HarvestConfig
    from trsae.store import _entry_path, harvest

    cfg = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=64 * 32, ctx_len=32, seqs_per_shard=16,
                        batch_size=4)
    ref = harvest(cfg, tmp_path / "ref", model=tiny_model, progress=False).manifest
    out = tmp_path / "out"
    harvest(cfg, out, model=tiny_model, progress=False, max_shards=1)
    shutil.copy(tmp_path / "ref" / "shard_00002.safetensors", out / "shard_00002.safetensors")
    _entry_path(out, 2).write_text(json.dumps(ref["shards"][2]))
    before = (out / "shard_00002.safetensors").stat().st_mtime_ns
    got = harvest(cfg, out, model=tiny_model, progress=False).manifest
    assert got["complete"] and got["shards"] == ref["shards"] and got["norm_scale"] == ref["norm_scale"]
    assert (out / "shard_00002.safetensors").stat().st_mtime_ns == before  # listed, not recomputed
    assert not _entry_path(out, 2).exists()
