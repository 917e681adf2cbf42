"""The device path as far as a CPU machine can check it: device names refused or resolved up front, mixed-precision
training (bfloat16 autocast, which CPUs run too), the run and store identities it leaves alone, a harvest whose
model runs in another dtype than its store, and `benchmarks/device_check.py`'s one line where there is no GPU.
The CUDA runs themselves are `benchmarks/device_check.py`'s, on a machine with a GPU."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trsae import experiments
from trsae.config import HarvestConfig, TrainConfig, train_identity
from trsae.device import DeviceError, resolve
from trsae.overhead import make_batch, make_optimizer
from trsae.saes import make_sae
from trsae.store import StoreError, harvest, store_identity
from trsae.train import train_sae, train_step
from trsae.tuning import families

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.mark.parametrize("bad", ["gpu", "cpu:0", "cuda:x", "CUDA", ""])
def test_bad_device_names_are_refused_by_the_configs(bad):
    for make in (lambda: TrainConfig(device=bad), lambda: HarvestConfig(device=bad)):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
            make()
    with pytest.raises(ValueError, match="amp must be None or one of bfloat16"):
        TrainConfig(amp="float16")
    with pytest.raises(ValueError, match="model_dtype"):
        HarvestConfig(model_dtype="int8")
    with pytest.raises(ValueError, match="float64 store is computed in float64"):
        HarvestConfig(dtype="float64", model_dtype="bfloat16")


@no_gpu
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(tiny_store, tmp_path):
    assert resolve("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"device '{name}' asked for, but torch .* sees no CUDA device"):
            resolve(name)
    spec = experiments.baseline_specs(tiny_store.d_model, 4 * tiny_store.d_model, 4)["TopK"]
    with pytest.raises(DeviceError):
        train_sae(spec, TrainConfig(tokens=256, batch_size=4, crop_len=32, device="cuda"), tiny_store,
                  tmp_path / "run", progress=False)
    cfg = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=256, ctx_len=32, device="cuda")
    with pytest.raises(DeviceError):
        harvest(cfg, tmp_path / "store", progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


def test_identities_leave_out_where_and_keep_what():
    base = train_identity(TrainConfig())
    assert "device" not in base and "amp" not in base  # a CPU run keeps the identity it had before devices
    assert train_identity(TrainConfig(device="cuda:3")) == base
    assert train_identity(TrainConfig(amp="bfloat16")) == base | {"amp": "bfloat16"}
    h = HarvestConfig()
    assert store_identity(dataclasses.replace(h, device="cuda")) == store_identity(h)
    assert "model_dtype" not in store_identity(h) and "device" not in store_identity(h)
    assert store_identity(dataclasses.replace(h, model_dtype="bfloat16"))["model_dtype"] == "bfloat16"


SPECS = families(64, 256, 8, {"window": 4, "curriculum_frac": 0.3})  # every family the notebooks compare


@pytest.mark.parametrize("name", list(SPECS))
def test_a_bfloat16_autocast_step_trains_in_float32(name):
    """One training step under bfloat16 autocast from the same weights as a float32 step: the loss is the float32
    one to bfloat16's precision but not bit for bit (autocast acts), and parameters, gradients and Adam's state
    stay float32 and finite."""
    x_BTD, mask_BT = make_batch(2, 32, 64)
    dead_F = torch.zeros(256, dtype=torch.bool)
    dead_F[::3] = True
    spec = SPECS[name]
    losses = {}
    for amp in (None, torch.bfloat16):
        torch.manual_seed(0)
        sae = make_sae(spec)
        opt = make_optimizer(sae)
        out = train_step(sae, opt, x_BTD, mask_BT, dead_F=dead_F, amp=amp)
        losses[amp] = out.loss.detach()
        assert out.loss.dtype == torch.float32
        for p in sae.parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p).all()
            assert p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
        assert all(t.dtype in (torch.float32, torch.int64) for st in opt.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.numel() > 1)
    torch.testing.assert_close(losses[torch.bfloat16], losses[None], rtol=5e-2, atol=1e-3)
    assert not torch.equal(losses[torch.bfloat16], losses[None])


def test_a_mixed_precision_run_is_its_own_run_and_resumes(tiny_store, tmp_path):
    spec = experiments.temporal_specs(tiny_store.d_model, 4 * tiny_store.d_model, 4, window=4,
                                      curriculum_frac=0.3)["TRSAE"]
    tc = TrainConfig(tokens=16 * 32 * 4, batch_size=4, crop_len=32, amp="bfloat16", checkpoint_every=2)
    train_sae(spec, tc, tiny_store, tmp_path / "amp", progress=False, max_steps=3)  # killed after 3 steps
    resumed = train_sae(spec, tc, tiny_store, tmp_path / "amp", progress=False)
    whole = train_sae(spec, tc, tiny_store, tmp_path / "whole", progress=False)
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)
    plain = train_sae(spec, dataclasses.replace(tc, amp=None), tiny_store, tmp_path / "plain", progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), whole.state_dict().values()))
    import json

    assert json.loads((tmp_path / "amp" / "run.json").read_text())["train"]["amp"] == "bfloat16"


def test_a_harvest_whose_model_runs_in_bfloat16(tiny_store, tiny_model, tmp_path):
    """``model_dtype`` bfloat16 with a float32 store: the model computes in bfloat16 and the store holds its
    activations in float32, close to the float32 harvest's but not equal; a float32 model is refused for it."""
    m = tiny_store.manifest
    cfg = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=m["n_seq"] * 32, ctx_len=32,
                        seqs_per_shard=8, batch_size=4, val_frac=0.1, test_frac=0.1, model_dtype="bfloat16")
    with pytest.raises(StoreError, match="runs in torch.bfloat16"):
        harvest(cfg, tmp_path / "refused", model=tiny_model, progress=False)
    store = harvest(cfg, tmp_path / "bf16", progress=False)
    assert store.manifest["config_hash"] != m["config_hash"] and store.dtype == torch.float32
    for seq in (0, 17):
        got, ref = store.sequence(seq)[0], tiny_store.sequence(seq)[0]
        assert got.dtype == torch.float32 and not torch.equal(got, ref)
        assert (got - ref).norm() / ref.norm() < 2e-2


@no_gpu
def test_device_check_prints_one_line_without_a_gpu():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("device_check: no CUDA device visible to torch")
