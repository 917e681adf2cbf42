"""Re-execute the notebooks in place with their smoke-sized defaults (what nbval checks in CI) and strip what must
not be committed from cells marked ``# NBVAL_IGNORE_OUTPUT``: their stderr streams (tqdm progress bars, warnings),
their progress widgets (with the widget state in the notebook's metadata) and their pictures (dashboard
screenshots: megabytes of base64, and in figures/ anyway).

    python notebooks/refresh.py [notebooks/02_temporal.ipynb ...]     # default: every notebooks/[0-9][0-9]_*.ipynb

Figures go to ``outputs/smoke-figures`` (as in ``./run_all.sh --tests``), never to the paper's ``figures/``. The smoke
defaults compute in float64 (their stores are ``"dtype": "float64"``), so the outputs written here hold on any CPU:
``tests/test_kernels.py`` checks that under ``notebooks/other_cpu.env``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


WIDGET = "application/vnd.jupyter.widget-view+json"


def strip(path: Path) -> None:
    nb = json.loads(path.read_text())
    nb.get("metadata", {}).pop("widgets", None)  # ipywidgets' saved state of the progress bars
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "".join(cell["source"]).startswith("# NBVAL_IGNORE_OUTPUT"):
            cell["outputs"] = [o for o in cell.get("outputs", [])
                               if not (o.get("output_type") == "stream" and o.get("name") == "stderr")
                               and not (o.get("output_type") == "display_data"
                                        and ("image/png" in o.get("data", {}) or WIDGET in o.get("data", {})))]
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def read_env(path: Path = ROOT / "notebooks" / "other_cpu.env") -> dict[str, str]:
    """The variables of an env file (``KEY=VALUE`` lines; ``#`` comments), by default the kernel settings that stand
    in for another CPU."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep or not key.isidentifier():
                raise ValueError(f"{path}: expected KEY=VALUE, got {line!r}")
            out[key] = value
    return out


def main(paths: list[str]) -> None:
    nbs = [Path(p).resolve() for p in paths] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    env = {**os.environ, "TRSAE_FIGURES_DIR": str(ROOT / "outputs" / "smoke-figures")}
    for nb in nbs:
        subprocess.run([sys.executable, "-m", "papermill", "--cwd", str(nb.parent), str(nb), str(nb)], env=env,
                       check=True)
        strip(nb)
        print(f"refreshed {nb.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
