#!/usr/bin/env bash
# Easel's front door. From a fresh clone with nothing installed:
#   bash infra/easel.sh demo    # set up, then run the whole pipeline on the embedded defaults
#   bash infra/easel.sh test    # set up, then run the test suite (what .ci/run calls)
#   bash infra/easel.sh setup   # only set up (.venv from the pinned lock; idempotent)
# Extra arguments go to `easel demo` or to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
LOCK="$ROOT/infra/requirements.lock"
STAMP="$VENV/.easel-install-stamp"

# Tools that phone home do not get to: this stack runs offline.
export DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false

pick_python() {
  for candidate in "${EASEL_PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "easel.sh: Python 3.11 is required (set EASEL_PYTHON to its path)" >&2
  return 1
}

# pip, with the local mirror's harmless "location is ignored" warnings filtered out; pip's status is kept.
pip_install() {
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# The lock into .venv: with uv where it can be had (a cold install here: about 20 s against pip's 90 s;
# infra/uv_install.py hands it the indexes pip is configured with), with pip otherwise or when
# EASEL_INSTALLER=pip. uv does not write bytecode either.
UV_REQUIREMENT="uv==0.13.9"
install_lock() {
  if [ "${EASEL_INSTALLER:-uv}" = uv ]; then
    if pip_install "$UV_REQUIREMENT" &&
       "$VENV/bin/python" "$ROOT/infra/uv_install.py" "$VENV/bin/python" "$VENV/bin/uv" "$LOCK"; then
      return 0
    fi
    echo "easel.sh: uv could not install the lock; installing it with pip" >&2
  fi
  pip_install --no-compile -r "$LOCK"
}

# What the stages, flows and tests import: imported once at setup, which also writes their bytecode.
# The project's own modules are imported where they are there: the Docker image sets up before it
# copies the project in.
WARM_IMPORTS="import torch, torchvision, diffusers, transformers, accelerate, open_clip, timm, \
great_expectations, pandas, pyarrow, scipy.stats, matplotlib.pyplot, skimage, boto3, prefect, prefect_dask, \
dvc.repo, dvclive, pytest, hypothesis
if __import__('os').path.isfile('components/cli.py'): import components.cli"
# Packages whose modules load lazily, when a stage builds or loads a model or writes a table or a
# report (diffusers' and transformers' model classes, torch.distributed under accelerate, pyarrow's
# Parquet): compiled whole at setup (about 10 s here). Without it, every stage process of a venv that
# does not write bytecode (PYTHONDONTWRITEBYTECODE, a read-only image) compiled about 600 modules.
LAZY_PACKAGES="diffusers transformers torch torchvision huggingface_hub dvc dulwich markdown_it mdurl PIL pyarrow \
pandas boto3 s3transfer tqdm matplotlib"
COMPILE_PACKAGES="import compileall, importlib.util, os, sys
for name in sys.argv[1:]:
    compileall.compile_dir(os.path.dirname(importlib.util.find_spec(name).origin), quiet=2, workers=0)"

setup() {
  case "${EASEL_INSTALLER:-uv}" in
    uv|pip) ;;
    *) echo "easel.sh: EASEL_INSTALLER must be uv or pip; got '${EASEL_INSTALLER}'" >&2; exit 2 ;;
  esac
  local want have=""
  want="$(cat "$LOCK" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  [ -f "$STAMP" ] && have="$(cat "$STAMP")"
  if [ "$want" = "$have" ] && [ -x "$VENV/bin/easel" ]; then
    return 0
  fi
  local py; py="$(pick_python)"
  echo "easel.sh: installing the pinned environment into .venv (first time: a few minutes)"
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  rm -f "$STAMP"
  # The lock pins every package, so nothing is resolved; --no-deps on the project keeps it that way.
  # No bytecode pass over 5 GB of packages (about half of a cold pip install): the import check below
  # writes it for what Easel imports (also where PYTHONDONTWRITEBYTECODE is set, which would
  # otherwise leave every later import compiling), and LAZY_PACKAGES for what its stages load later.
  install_lock
  pip_install --no-deps --no-build-isolation -e "$ROOT"
  env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -c "$WARM_IMPORTS" \
    || { echo "easel.sh: the environment in .venv does not import; see the pip output above" >&2; exit 1; }
  # shellcheck disable=SC2086 # one package name per word
  "$VENV/bin/python" -c "$COMPILE_PACKAGES" $LAZY_PACKAGES
  echo "$want" > "$STAMP"
}

cmd="${1:-}"; [ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/easel" demo "$@" ;;
  # One test process per core (pytest-xdist; EASEL_TEST_WORKERS to change), each with one torch/BLAS
  # thread: two CPU-bound tests then never fight over a core. (Two workers of two threads each on 2
  # cores did twice the CPU work and finished no sooner; benchmarks/RESULTS.md.)
  test)  setup; export PATH="$VENV/bin:$PATH"
         export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" \
                OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
         exec "$VENV/bin/python" -m pytest -n "${EASEL_TEST_WORKERS:-auto}" --dist worksteal "$@" ;;
  *) echo "usage: bash infra/easel.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
