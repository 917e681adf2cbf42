import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trsae.config import HarvestConfig
from trsae.store import ActivationStore, StoreError, harvest

CFG = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=40 * 32, ctx_len=32, seqs_per_shard=8,
                    batch_size=4, val_frac=0.1, test_frac=0.1)


def test_stored_acts_equal_the_models_hidden_states(tiny_store, tiny_model):
    for seq in (0, 17, 39):
        acts_TD, ids_T = tiny_store.sequence(seq)
        ref = tiny_model.hf(ids_T[None].long(), output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(acts_TD, ref, rtol=0, atol=1e-5)
        assert ids_T[0] == tiny_model.bos_id


def test_manifest_says_what_the_store_is(tiny_store):
    m = tiny_store.manifest
    assert (m["model"], m["layer"], m["data"], m["ctx_len"], m["dtype"]) == ("tiny-gpt2", 1, "brown", 32, "float32")
    assert m["token_count"] == 40 * 32 and m["complete"] and len(m["shards"]) == 5
    assert m["split"] == {"train": 32, "val": 4, "test": 4}


def test_norm_scale_gives_unit_mean_square_per_dim_on_train(tiny_store):
    sq = []
    for seq in tiny_store.splits["train"]:
        a, ids = tiny_store.sequence(int(seq))
        sq.append(a[ids != 50256].double().pow(2).sum(-1))
    mean_sq = torch.cat(sq).mean().item()
    assert tiny_store.norm_scale ** 2 * mean_sq == pytest.approx(tiny_store.d_model, rel=1e-6)


def test_splits_are_disjoint_and_cover_every_sequence(tiny_store):
    s = tiny_store.splits
    allseq = np.concatenate([s["train"], s["val"], s["test"]])
    assert sorted(allseq.tolist()) == list(range(40))


def test_interrupted_harvest_resumes_to_the_same_store(tmp_path, tiny_model, tiny_store):
    out = tmp_path / "resumed"
    partial = harvest(CFG, out, model=tiny_model, progress=False, max_shards=2)
    assert not partial.manifest["complete"] and len(partial.manifest["shards"]) == 2
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(out)
    resumed = harvest(CFG, out, model=tiny_model, progress=False, max_shards=1)
    resumed = harvest(CFG, out, model=tiny_model, progress=False)
    ref = tiny_store.manifest
    got = resumed.manifest
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert got["norm_scale"] == ref["norm_scale"] and got["complete"]


RESUME_UNDER_OTHER_THREADS = """
import json, sys, torch
from trsae.lm import load_model
from trsae.store import harvest
from tests.test_store import CFG
A, B, bias = torch.randn(128, 64), torch.randn(64, 256), torch.randn(256)
torch.set_num_threads(1)
one = torch.addmm(bias, A, B)
torch.set_num_threads(2)
if torch.equal(one, torch.addmm(bias, A, B)):
    print(json.dumps({"premise": False})); sys.exit()
model = load_model("tiny-gpt2", seed=0)
ref = harvest(CFG, sys.argv[1] + "/ref", model=model, progress=False).manifest
harvest(CFG, sys.argv[1] + "/resumed", model=model, progress=False, max_shards=2)
torch.set_num_threads(1)
got = harvest(CFG, sys.argv[1] + "/resumed", model=model, progress=False).manifest
print(json.dumps({"premise": True, "ref": [s["sha256"] for s in ref["shards"]],
                  "got": [s["sha256"] for s in got["shards"]], "threads_after": torch.get_num_threads()}))
"""


def test_resume_under_another_thread_count_gives_the_same_store(tmp_path):
    """On MKL's AVX2 path (what it runs on AMD CPUs) sgemm's bits depend on the thread count, and MKL picks that
    count per call unless told not to: the cause of shards that differed now and then in CI. The harvest runs on
    the thread count it started with, so a resume under another setting writes the same bytes."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", RESUME_UNDER_OTHER_THREADS, str(tmp_path)], env=env, check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    res = json.loads(out.strip().splitlines()[-1])
    if not res["premise"]:
        pytest.skip("MKL's sgemm gives the same bits on 1 and 2 threads here; nothing to pin")
    assert res["got"] == res["ref"]
    assert res["threads_after"] == 1  # the caller's setting is restored


def test_importing_the_project_makes_mkl_reproducible():
    """MKL's own report of a call made after ``import trsae.lm``: conditional numerical reproducibility on (without it
    a harvest resumed under load wrote a shard that differed in its last bits) and no per-call thread count."""
    import os
    import subprocess
    import sys

    if not torch.backends.mkl.is_available():
        pytest.skip("torch is not built with MKL here")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_DYNAMIC")} | {"MKL_VERBOSE": "1"}
    code = "import trsae.lm, torch; torch.ones(64, 64) @ torch.ones(64, 64)"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    call = [ln for ln in out.splitlines() if "SGEMM" in ln]
    assert call and "CNR:AUTO" in call[0] and "Dyn:0" in call[0], out


def test_another_config_in_the_same_folder_is_refused(tmp_path, tiny_model):
    harvest(CFG, tmp_path, model=tiny_model, progress=False, max_shards=1)
    with pytest.raises(StoreError, match="another configuration"):
        harvest(dataclasses.replace(CFG, layer=2), tmp_path, model=tiny_model, progress=False)


def _copy_store(src, dst):
    import shutil
    shutil.copytree(src.path, dst)
    return dst


def test_corrupted_shard_is_detected(tmp_path, tiny_store):
    p = _copy_store(tiny_store, tmp_path / "s")
    shard = p / "shard_00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0xFF
    shard.write_bytes(bytes(raw))
    store = ActivationStore(p)
    store.sequence(0)  # shard 0 is intact
    with pytest.raises(StoreError, match="corrupted or truncated"):
        store.sequence(8)


def test_truncated_shard_is_detected_even_without_checksums(tmp_path, tiny_store):
    p = _copy_store(tiny_store, tmp_path / "s")
    shard = p / "shard_00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(StoreError, match="truncated or altered"):  # at open: size against the manifest
        ActivationStore(p)
    m = json.loads((p / "manifest.json").read_text())  # a manifest without sizes: caught when the shard is read
    for sh in m["shards"]:
        del sh["bytes"]
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="corrupted or truncated"):
        ActivationStore(p).sequence(16)
    with pytest.raises(StoreError, match="cannot be read"):
        ActivationStore(p, verify=False).sequence(16)


def test_missing_store_and_broken_manifest(tmp_path):
    with pytest.raises(StoreError, match="python -m trsae harvest"):
        ActivationStore(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        ActivationStore(tmp_path)


@pytest.mark.parametrize("shuffle", ["crop", "sequence", None])
@pytest.mark.parametrize("crop_len", [8, 32])
def test_windows_are_whole_and_never_mix_sequences(tiny_store, shuffle, crop_len):
    n = 0
    for b in tiny_store.batches("train", batch_size=6, crop_len=crop_len, shuffle=shuffle, seed=1, epochs=1):
        for acts_TD, ids_T, pos_T, seq in zip(b.acts_BTD, b.ids_BT, b.pos_BT, b.seq_B):
            ref_acts, ref_ids = tiny_store.sequence(int(seq))
            assert int(seq) in tiny_store.splits["train"]
            assert torch.equal(pos_T, torch.arange(pos_T[0], pos_T[0] + crop_len))
            assert torch.equal(ids_T, ref_ids[pos_T].long())
            torch.testing.assert_close(acts_TD, ref_acts[pos_T] * tiny_store.norm_scale)
            n += 1
    assert n == (32 * (32 // crop_len)) // 6 * 6


@pytest.mark.parametrize("context", [3, 8])
def test_crops_carry_their_left_margin_as_context_only(tiny_store, context):
    """With a left margin, each crop is the same crop as without one (same order), preceded by the ``context``
    tokens before it in its sequence: read as context (`ctx_BT`), never trained on (`mask_BT`); before the
    sequence's start, padding that is neither."""
    kw = {"batch_size": 6, "crop_len": 8, "seed": 2, "epochs": 1}
    plain = list(tiny_store.batches("train", **kw))
    margin = list(tiny_store.batches("train", context=context, **kw))
    assert len(plain) == len(margin)
    padded = 0
    for a, b in zip(plain, margin):
        assert b.acts_BTD.shape[1] == context + 8
        crop = b.without_margin(context)
        for name in ("acts_BTD", "mask_BT", "pos_BT", "ids_BT", "seq_B"):
            assert torch.equal(getattr(crop, name), getattr(a, name))
        assert not b.mask_BT[:, :context].any()
        for acts_TD, ids_T, pos_T, ctx_T, seq in zip(b.acts_BTD, b.ids_BT, b.pos_BT, b.ctx_BT, b.seq_B):
            ref_acts, ref_ids = tiny_store.sequence(int(seq))
            start = int(pos_T[context])
            for t in range(context):  # the margin: the tokens before the crop, or padding
                p = start - context + t
                if p < 0:
                    padded += 1
                    assert not ctx_T[t] and not acts_TD[t].any()
                    continue
                assert int(pos_T[t]) == p and ids_T[t] == ref_ids[p]
                torch.testing.assert_close(acts_TD[t], ref_acts[p] * tiny_store.norm_scale)
                assert bool(ctx_T[t]) == (int(ref_ids[p]) != 50256)
        assert torch.equal(b.ctx_BT[:, context:], b.mask_BT[:, context:])
    assert padded > 0  # crops at a sequence's start were among them
    with pytest.raises(ValueError, match="context"):
        next(tiny_store.batches("train", batch_size=2, crop_len=32, context=1))


@pytest.mark.parametrize("batch_size, crop_len", [(5, 8), (8, 8), (3, 16)])
def test_a_shuffled_epoch_is_every_crop_once_in_batches_of_distinct_sequences(tiny_store, batch_size, crop_len):
    """Decorrelated batches: in a "crop"-shuffled epoch every crop of the split comes exactly once, and each batch
    takes its crops from distinct sequences (a buffer of the tiny store's 5 shards holds more sequences than a
    batch)."""
    seen = []
    for b in tiny_store.batches("train", batch_size=batch_size, crop_len=crop_len, seed=4, epochs=1,
                                buffer_shards=5):
        assert len(set(b.seq_B.tolist())) == batch_size
        seen += [(int(s), int(p)) for s, p in zip(b.seq_B, b.pos_BT[:, 0])]
    every = sorted((int(s), p) for s in tiny_store.splits["train"] for p in range(0, 32, crop_len))
    n_full = len(every) // batch_size * batch_size
    assert len(seen) == len(set(seen)) == n_full and set(seen) <= set(every)


def test_bos_never_reaches_training_tokens(tiny_store):
    saw_bos = False
    for b in tiny_store.batches("train", batch_size=4, crop_len=8, seed=0, epochs=1):
        assert not (b.ids_BT[b.mask_BT] == 50256).any()
        assert (b.mask_BT == (b.ids_BT != 50256)).all()
        saw_bos |= bool((~b.mask_BT).any())
    assert saw_bos  # windows that start a sequence carry BOS, masked out


def test_cursor_resumes_the_same_stream(tiny_store):
    full = list(tiny_store.batches("train", batch_size=5, crop_len=16, seed=3, epochs=3))
    tail = list(tiny_store.batches("train", batch_size=5, crop_len=16, seed=3, start=7, epochs=3))
    assert len(tail) == len(full) - 7
    for a, b in zip(full[7:], tail):
        assert torch.equal(a.seq_B, b.seq_B) and torch.equal(a.pos_BT, b.pos_BT)
    # a new epoch is a new permutation, and a shuffled epoch differs from the ordered one
    per_epoch = len(full) // 3
    assert not torch.equal(full[0].seq_B, full[per_epoch].seq_B) or not torch.equal(full[0].pos_BT, full[per_epoch].pos_BT)


def test_window_must_divide_context(tiny_store):
    with pytest.raises(ValueError, match="divide"):
        next(tiny_store.batches("train", crop_len=5))


@pytest.mark.slow
def test_gemma_store_equals_hidden_states(tmp_path, gemma_model):
    cfg = HarvestConfig(model="gemma-3-270m", layer=6, data="sotu", tokens=3 * 16, ctx_len=16, seqs_per_shard=2,
                        batch_size=2, val_frac=0.0, test_frac=0.0)
    store = harvest(cfg, tmp_path, model=gemma_model, progress=False)
    for seq in range(3):
        acts_TD, ids_T = store.sequence(seq)
        ref = gemma_model.hf(ids_T[None].long(), output_hidden_states=True).hidden_states[7][0]
        torch.testing.assert_close(acts_TD, ref, rtol=1e-5, atol=1e-3)
        assert ids_T[0] == 2  # Gemma's BOS
    assert json.loads((tmp_path / "manifest.json").read_text())["d_model"] == 640


@pytest.mark.parametrize("n_seqs, batch_size", [(1, 4), (5, 4), (6, 1), (7, 3), (10**6, 4)])
def test_first_sequences_are_the_same_whatever_the_batch_size(tiny_store, n_seqs, batch_size):
    """`ActivationStore.first` gives exactly the first n_seqs sequences of the split in store order (all of them if
    the split is shorter), in any batch size: what evaluation, the ceiling, test_tokens and dashboards all read."""
    got = list(tiny_store.first("train", n_seqs, batch_size))
    seqs = torch.cat([b.seq_B for b in got]).tolist()
    want = [int(s) for s in tiny_store.splits["train"][:n_seqs]]
    assert seqs == want
    assert all(len(b.seq_B) <= batch_size for b in got)
    one = torch.cat([b.acts_BTD for b in tiny_store.first("train", n_seqs, 1)])
    assert torch.equal(torch.cat([b.acts_BTD for b in got]), one)
    for skip in (0, 1, batch_size, 2 * batch_size + 1):  # a later part of the same sequences
        later = [int(s) for b in tiny_store.first("train", n_seqs, batch_size, skip=skip) for s in b.seq_B]
        assert later == want[skip:]
