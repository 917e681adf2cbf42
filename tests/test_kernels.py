"""The notebooks' checked outputs do not depend on the CPU's kernels: notebook 03 (smaller than its smoke defaults:
fewer tokens, a narrower dictionary, one evaluation sequence; the same code path) is executed twice, under this
machine's own kernels and under ``notebooks/other_cpu.env`` (PyTorch's scalar kernels, MKL's COMPATIBLE branch,
OpenBLAS's Haswell kernels: every float sum in another order, as on another CPU), and every output that nbval checks
must print the same.

This holds because the smoke defaults compute in float64 end to end (a ``"dtype": "float64"`` store: the model's
forward under `trsae.lm.Float64Math`, the SAEs' training and evaluation); in float32 the kernels' last-bit
differences grow over the training steps into the printed digits, and this test fails (CE-loss scores, EV deltas).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trsae.params import notebook_defaults

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "03_ablations.ipynb"


def _read_env() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        from refresh import read_env
    finally:
        sys.path.pop(0)
    return read_env()


def _checked_outputs(path: Path) -> list[str]:
    """The text of every output nbval compares: cells not marked ``# NBVAL_IGNORE_OUTPUT``."""
    out = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code" or "".join(cell["source"]).startswith("# NBVAL_IGNORE_OUTPUT"):
            continue
        for o in cell.get("outputs", []):
            out.append("".join(o.get("text", "")) or "".join(o.get("data", {}).get("text/plain", "")))
    return out


def _execute(tmp: Path, name: str, env: dict[str, str], params: dict) -> Path:
    out = tmp / f"{name}.ipynb"
    (tmp / f"{name}.yaml").write_text(json.dumps(params | {"work_dir": str(tmp / f"work-{name}")}))
    subprocess.run([sys.executable, "-m", "papermill", "--cwd", str(NOTEBOOK.parent), "-f", str(tmp / f"{name}.yaml"),
                    str(NOTEBOOK), str(out)], env={**os.environ, **env, "TRSAE_FIGURES_DIR": str(tmp / f"fig-{name}")},
                   check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_checked_outputs_do_not_depend_on_the_cpu_kernels(tmp_path):
    defaults = notebook_defaults(NOTEBOOK)
    params = {"harvest": defaults["harvest"] | {"tokens": 10_240},  # 80 sequences: 4 test, 72 train
              "train": defaults["train"] | {"tokens": 10_240}, "sae": defaults["sae"] | {"width_mult": 2},
              "windows": [0, 16], "pred_k": 0, "eval_seqs": 1}  # the LM passes cost most under the scalar kernels
    here = _execute(tmp_path, "here", {}, params)
    other = _execute(tmp_path, "other", _read_env(), params)
    a, b = _checked_outputs(here), _checked_outputs(other)
    assert len(a) >= 2 and any("explained variance" in t for t in a)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"checked output {i} differs between this CPU's kernels and another's:\n{x}\n---\n{y}"
