"""The same configuration and seed give the same numbers: the whole notebook path (harvest, train, evaluate,
summarise) run twice from scratch in two folders agrees to every printed digit, and the trained weights are
bitwise equal. (nbval checks the same of the notebooks' printed numbers against their committed outputs.)"""

import math

import pytest
import torch

from trsae import analysis, experiments, runner
from trsae.config import HarvestConfig, TrainConfig


def _rounded(x, digits=4):
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items() if k not in ("run", "tok_per_s")}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    if isinstance(x, float) and math.isfinite(x) and x != 0:
        return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return x


def _run(work, tiny_model):
    store = runner.ensure_store(HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=4096, ctx_len=32,
                                             seqs_per_shard=16, batch_size=4), work, model=tiny_model)
    specs = experiments.temporal_specs(store.d_model, 4 * store.d_model, k=4, window=4)
    specs.pop("TopK-wide")
    train_cfg = TrainConfig(tokens=2048, batch_size=4, crop_len=32)
    evaluate = runner.Evaluator(store, model=tiny_model, max_seqs=4)
    per_seed = runner.train_and_evaluate(specs, [0, 1], train_cfg, store, evaluate, work, progress=False)
    return per_seed, analysis.summarize(per_seed)


@pytest.mark.slow
def test_two_runs_from_scratch_give_the_same_numbers(tmp_path, tiny_model):
    from trsae.saes import load_sae

    per_a, sum_a = _run(tmp_path / "a", tiny_model)
    per_b, sum_b = _run(tmp_path / "b", tiny_model)
    assert _rounded(sum_a) == _rounded(sum_b)
    for name in per_a:
        for ra, rb in zip(per_a[name], per_b[name]):
            wa, wb = load_sae(f"{ra['run']}/sae").state_dict(), load_sae(f"{rb['run']}/sae").state_dict()
            assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    # the seeds do matter (a run that ignored its seed would pass the checks above trivially)
    wa0 = load_sae(f"{per_a['TopK'][0]['run']}/sae").W_dec
    wa1 = load_sae(f"{per_a['TopK'][1]['run']}/sae").W_dec
    assert not torch.equal(wa0, wa1)


def _read_env():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "notebooks" / "refresh.py"
    spec = importlib.util.spec_from_file_location("refresh", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.read_env


def test_other_cpu_kernels_reach_a_fresh_process(tmp_path):
    """notebooks/other_cpu.env (the stand-in for another CPU of tests/test_kernels.py) switches PyTorch to its scalar
    kernels in a new process; a misspelled variable or a malformed line fails here."""
    import os
    import subprocess
    import sys

    read_env = _read_env()
    env = read_env()
    assert env["ATEN_CPU_CAPABILITY"] == "default" and env["MKL_CBWR"] == "COMPATIBLE"
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env={**os.environ, **env}, check=True, capture_output=True, text=True).stdout.split()
    assert out == ["DEFAULT"]
    bad = tmp_path / "bad.env"
    bad.write_text("# a comment\nMKL_CBWR COMPATIBLE\n")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        read_env(bad)
