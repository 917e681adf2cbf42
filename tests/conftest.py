"""Shared fixtures. Tests run offline: data come from $TRSAE_DATA_DIR (default: ../shared/data beside the
checkout), models from their PyPI packages (converted once into $TRSAE_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_mirror = ROOT.parent / "shared" / "data"
if not os.environ.get("TRSAE_DATA_DIR") and _mirror.is_dir():
    os.environ["TRSAE_DATA_DIR"] = str(_mirror)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = os.environ.get("TRSAE_DATA_DIR")
    if not d or not Path(d).is_dir():
        pytest.fail("set TRSAE_DATA_DIR to the data mirror (e.g. ../shared/data); see README")
    return Path(d)


@pytest.fixture(scope="session")
def tiny_model(data_dir):
    from trsae.lm import load_model

    return load_model("tiny-gpt2", seed=0)


@pytest.fixture(scope="session")
def gemma_model(data_dir):
    from trsae.lm import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model):
    """A small finished store of tiny-gpt2 layer 1 activations on Brown (40 sequences of 32 tokens)."""
    from trsae.config import HarvestConfig
    from trsae.store import harvest

    cfg = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=40 * 32, ctx_len=32,
                        seqs_per_shard=8, batch_size=4, val_frac=0.1, test_frac=0.1)
    return harvest(cfg, tmp_path_factory.mktemp("store"), model=tiny_model, progress=False)
