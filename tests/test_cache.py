"""The result cache is keyed by the configuration and the code: changed ``trsae/`` source never reuses a stored
harvest, run or evaluation."""

import shutil
from pathlib import Path

from trsae import cache
from trsae.config import HarvestConfig, TrainConfig
from trsae.saes import SAEConfig


class _Store:
    manifest = {"config_hash": "0123456789abcdef", "model": "tiny-gpt2"}


def _keys(work):
    return (cache.store_dir(HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=4096), work),
            cache.run_dir(SAEConfig.build(8, 32, "topk", k=4), TrainConfig(tokens=2048), _Store(), work),
            cache.Evaluator(_Store(), split="test", max_seqs=4).path(Path(work) / "run"))


def test_code_version_changes_with_any_source_file(tmp_path):
    src = tmp_path / "trsae"
    shutil.copytree(cache.PACKAGE, src, ignore=shutil.ignore_patterns("__pycache__"))
    before = cache.source_hash(src)
    assert before == cache.source_hash(src) and len(before) == 16
    (src / "report" / "figures.py").write_text((src / "report" / "figures.py").read_text() + "\n# changed\n")
    assert cache.source_hash(src) != before
    changed = cache.source_hash(src)
    (src / "new_module.py").write_text("")
    assert cache.source_hash(src) != changed  # a new file counts too
    assert cache.source_hash(src / "report") != cache.source_hash(src)


def test_every_cache_key_includes_the_code_version(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "code_version", lambda: "a" * 16)
    a = _keys(tmp_path)
    assert a == _keys(tmp_path)  # the same code and configuration: the same folders
    monkeypatch.setattr(cache, "code_version", lambda: "b" * 16)
    b = _keys(tmp_path)
    assert all(x != y for x, y in zip(a, b)), (a, b)
    assert b[0].parent == tmp_path / "stores" and b[1].parent == tmp_path / "runs"
