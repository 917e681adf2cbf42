"""The README's library example runs as written (on the tiny random GPT-2, offline)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use as a library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the library section holds one python example"
    return blocks[0]


@pytest.mark.slow
def test_the_library_example_runs(tmp_path, data_dir):
    pytest.importorskip("sae_lens", reason="the example exports to SAELens: pip install -e '.[saelens]'")
    r = subprocess.run([sys.executable, "-c", _example()], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "TRSAE_DATA_DIR": str(data_dir)}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    for name in ("TopK", "TRSAE"):
        line = next(ln for ln in lines if ln.startswith(name + " EV"))
        ev, ce = (float(v) for v in re.findall(r"-?\d+\.\d+", line))
        assert -1 < ev <= 1 and ce <= 1
    assert (tmp_path / "library-example" / "dashboard" / "index.html").is_file()
    assert (tmp_path / "library-example" / "saelens" / "TRSAE" / "cfg.json").is_file()
    assert lines[-1].startswith("open ")
