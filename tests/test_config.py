import json
import subprocess
import sys

import pytest

from trsae.config import HarvestConfig, TrainConfig, check_params_file, notebook_parameters


def _notebook(tmp_path, source):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": source, "outputs": []},
                    {"cell_type": "code", "metadata": {}, "source": "other = 1", "outputs": []}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    p = tmp_path / "nb.ipynb"
    p.write_text(json.dumps(nb))
    return p


def test_notebook_parameters_are_read_from_the_tagged_cell(tmp_path):
    nb = _notebook(tmp_path, "a = 1\nb: int = 2\n# comment\nc = [1, 2]\n")
    assert notebook_parameters(nb) == {"a", "b", "c"}


def test_unknown_parameter_key_is_refused(tmp_path):
    nb = _notebook(tmp_path, "a = 1\nb = 2\n")
    (tmp_path / "ok.yaml").write_text("a: 3\n")
    assert check_params_file(tmp_path / "ok.yaml", [nb]) == {"a": 3}
    (tmp_path / "bad.yaml").write_text("a: 3\nlayr: 6\n")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['layr'\]"):
        check_params_file(tmp_path / "bad.yaml", [nb])


def test_cli_reports_one_error_line_and_exit_2(tmp_path):
    nb = _notebook(tmp_path, "a = 1\n")
    (tmp_path / "bad.yaml").write_text("zzz: 1\n")
    r = subprocess.run([sys.executable, "-m", "trsae", "check-params", str(tmp_path / "bad.yaml"), str(nb)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "zzz" in r.stderr


def test_every_profile_file_uses_only_known_parameters():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    notebooks = sorted(root.glob("notebooks/[0-9][0-9]_*.ipynb"))
    assert notebooks
    for params in sorted(root.glob("params/*.yaml")):
        check_params_file(params, notebooks)


@pytest.mark.parametrize("kw, msg", [
    ({"tokens": 0}, "tokens must be positive"), ({"ctx_len": -4}, "ctx_len must be positive"),
    ({"ctx_len": 1}, "at least 2"), ({"layer": -1}, "layer"), ({"dtype": "int8"}, "dtype"),
    ({"val_frac": 0.6, "test_frac": 0.5}, "sum below 1"),
])
def test_harvest_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        HarvestConfig(**kw)


@pytest.mark.parametrize("kw, msg", [
    ({"tokens": 0}, "tokens"), ({"batch_size": -1}, "batch_size"), ({"lr": 0}, "lr"),
    ({"shuffle": "token"}, "never|crop"), ({"warmup_frac": 0.9, "decay_frac": 0.5}, "sum to at most 1"),
])
def test_train_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)
