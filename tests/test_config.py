import json
import subprocess
import sys
from pathlib import Path

import pytest

from trsae.config import HarvestConfig, TrainConfig
from trsae.params import check_params_file, load_params, notebook_defaults, notebook_parameters, notebook_view


def _notebook(tmp_path, source, name="nb"):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": source, "outputs": []},
                    {"cell_type": "code", "metadata": {}, "source": "other = 1", "outputs": []}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    p = tmp_path / f"{name}.ipynb"
    p.write_text(json.dumps(nb))
    return p


def test_notebook_parameters_are_read_from_the_tagged_cell(tmp_path):
    nb = _notebook(tmp_path, "a = 1\nb: int = 2\n# comment\nc = [1, 2]\nd = {'x': 1}\ne = f(1)\n")
    assert notebook_parameters(nb) == {"a", "b", "c", "d", "e"}
    assert notebook_defaults(nb) == {"a": 1, "b": 2, "c": [1, 2], "d": {"x": 1}, "e": None}


def test_unknown_parameter_key_is_refused(tmp_path):
    nb = _notebook(tmp_path, "a = 1\nb = 2\n")
    (tmp_path / "ok.yaml").write_text("nb:\n  a: 3\n")
    assert check_params_file(tmp_path / "ok.yaml", [nb]) == {"nb": {"a": 3}}
    (tmp_path / "bad.yaml").write_text("nb:\n  a: 3\n  layr: 6\n")
    with pytest.raises(ValueError, match=r"section 'nb' sets \['layr'\], which nb.ipynb does not declare"):
        check_params_file(tmp_path / "bad.yaml", [nb])
    (tmp_path / "shared.yaml").write_text("shared:\n  zz: 1\n")
    with pytest.raises(ValueError, match=r"shared parameter\(s\) \['zz'\] are declared by no notebook"):
        check_params_file(tmp_path / "shared.yaml", [nb])
    (tmp_path / "stray.yaml").write_text("02_nb:\n  a: 1\n")
    with pytest.raises(ValueError, match=r"section\(s\) \['02_nb'\] name no notebook"):
        check_params_file(tmp_path / "stray.yaml", [nb])
    (tmp_path / "flat.yaml").write_text("a: 3\n")
    with pytest.raises(ValueError, match=r"not a section: \['a'\]"):
        check_params_file(tmp_path / "flat.yaml", [nb])


def test_notebook_view_merges_shared_and_own_sections(tmp_path):
    one = _notebook(tmp_path, "a = 1\nh = {'x': 1, 'y': 2}\nonly_one = 0\n", "one")
    two = _notebook(tmp_path, "a = 1\nh = {'x': 1, 'y': 2}\n", "two")
    params = {"shared": {"a": 5, "h": {"x": 10, "y": 20}, "only_one": 7}, "two": {"h": {"y": 30}, "a": 6}}
    # each notebook takes only the shared keys it declares; a mapping in its own section merges key by key
    assert notebook_view(params, one) == {"a": 5, "h": {"x": 10, "y": 20}, "only_one": 7}
    assert notebook_view(params, two) == {"a": 6, "h": {"x": 10, "y": 30}}
    # a half-given mapping (no shared part to merge with) or a misspelt key inside one is refused
    with pytest.raises(ValueError, match=r"'h' for two.ipynb must be a mapping with the keys \['x', 'y'\]"):
        notebook_view({"two": {"h": {"y": 30}}}, two)
    with pytest.raises(ValueError, match="must be a mapping"):
        notebook_view({"shared": {"h": {"x": 1, "yy": 2}}}, two)


def test_a_profile_may_add_where_the_work_runs_to_harvest_and_train(tmp_path):
    nb = _notebook(tmp_path, "harvest = {'model': 'm', 'layer': 1}\ntrain = {'tokens': 10}\n")
    gpu = {"shared": {"harvest": {"model": "m", "layer": 1, "device": "cuda", "model_dtype": "bfloat16"},
                      "train": {"tokens": 10, "device": "cuda", "amp": "bfloat16"}}}
    assert notebook_view(gpu, nb)["train"] == {"tokens": 10, "device": "cuda", "amp": "bfloat16"}
    with pytest.raises(ValueError, match=r"and optionally \['amp', 'device'\].*got \['devcie', 'tokens'\]"):
        notebook_view({"shared": {"train": {"tokens": 10, "devcie": "cuda"}}}, nb)
    with pytest.raises(ValueError, match="must be a mapping"):  # the optional keys are harvest's and train's only
        notebook_view({"shared": {"harvest": {"model": "m", "layer": 1, "amp": "bfloat16"}}}, nb)


def test_cli_reports_one_error_line_and_exit_2(tmp_path):
    nb = _notebook(tmp_path, "a = 1\n")
    (tmp_path / "bad.yaml").write_text("nb:\n  zzz: 1\n")
    r = subprocess.run([sys.executable, "-m", "trsae", "check-params", str(tmp_path / "bad.yaml"), str(nb)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "zzz" in r.stderr


def test_every_profile_file_gives_each_notebook_a_valid_view():
    root = Path(__file__).resolve().parents[1]
    notebooks = sorted(root.glob("notebooks/[0-9][0-9]_*.ipynb"))
    assert notebooks
    for params in sorted(root.glob("params/*.yaml")):
        check_params_file(params, notebooks)
    # the cpu profile's view of 03 is the shared set-up with 03's own training budget merged in
    cpu = load_params(root / "params" / "cpu.yaml")
    view = notebook_view(cpu, root / "notebooks" / "03_ablations.ipynb")
    assert view["train"]["tokens"] < cpu["shared"]["train"]["tokens"]
    assert view["train"]["batch_size"] == cpu["shared"]["train"]["batch_size"]
    assert view["harvest"] == cpu["shared"]["harvest"]


def test_a_parameter_file_extends_another_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("shared:\n  train: {tokens: 10, lr: 0.1}\n  seeds: [0, 1]\n"
                                        "nb:\n  budgets: [1, 2]\n  keep: 3\n")
    (tmp_path / "long.yaml").write_text("extends: base.yaml\nshared:\n  train: {tokens: 20}\n"
                                        "nb:\n  budgets: [1, 2, 4]\nother:\n  x: 1\n")
    got = load_params(tmp_path / "long.yaml")
    assert got == {"shared": {"train": {"tokens": 20, "lr": 0.1}, "seeds": [0, 1]},
                   "nb": {"budgets": [1, 2, 4], "keep": 3}, "other": {"x": 1}}
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ValueError, match="loops back"):
        load_params(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_params(tmp_path / "missing.yaml")


def test_the_long_cpu_profile_is_the_cpu_profile_with_a_longer_curve():
    root = Path(__file__).resolve().parents[1]
    cpu, long = (load_params(root / "params" / f"{p}.yaml") for p in ("cpu", "cpu_long"))
    assert max(long["02_temporal"]["length_budgets"]) >= 4_800_000
    assert set(cpu["02_temporal"]["length_budgets"]) < set(long["02_temporal"]["length_budgets"])
    assert {k: v for k, v in long.items() if k != "02_temporal"} == {k: v for k, v in cpu.items() if k != "02_temporal"}


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


def test_help_gives_each_parts_own_default_for_a_shared_setting():
    """`--pred-k` and `--d-v` belong to TFA and the TRSAE encoder with different defaults: the help names both,
    each with its own default (not the first registered part's alone)."""
    from trsae.__main__ import build_parser
    from trsae.saes.config import part_classes

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    helps = {s: a.help for a in train._actions for s in a.option_strings}
    for name in ("pred_k", "d_v"):
        text = helps["--" + name.replace("_", "-")]
        for part in ("tfa", "trsae"):
            default = getattr(part_classes("encoder", part)[0], name)
            assert f"[{part}]" in text and f"(default: {default})" in text, (name, part, text)
