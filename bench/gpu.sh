#!/usr/bin/env bash
# Run the features benchmark on one GPU under KERAS_BACKEND=jax, bfloat16,
# batches of 256 and one decoding thread per CPU core.
#
# The GPU machine needs Python 3.11 or later (Keras 3.15 requires it) with
# JAX for CUDA installed, which brings NumPy and ml-dtypes; TensorFlow is
# not needed. This script installs only Keras, its pure-Python
# dependencies, h5py and Pillow, without their dependencies, into a folder
# on PYTHONPATH, so it works whether JAX lives in the system Python, a
# virtual environment or conda. The wheels come from PyPI when the index is
# reachable, otherwise from a folder fetched beforehand with --fetch-wheels.
#
# Usage:
#   bash bench/gpu.sh [--dry-run] [--data DIR] [--wheels DIR] [-- ARGS for python -m bench.gpu]
#   bash bench/gpu.sh --fetch-wheels DIR
#
# The report goes to $OUT/benchmarks-gpu.md when OUT is set, otherwise to
# docs/benchmarks-gpu.md.
#
# NOTE: never run on a GPU so far (only --dry-run, --fetch-wheels and the
# offline install on a CPU machine), so the expected time of the default
# run (8,192 images, one repeat), about 5 minutes on one H200 with 16
# cores, is an estimate.
set -euo pipefail

cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SITE=${GPU_SITE:-.gpu-site}
WHEELS=${WHEELS:-bench/wheels}
DATA=""
DRY_RUN=0
FETCH_DIR=""
BENCH_ARGS=()

# Versions tested with the CPU benchmark; numpy and ml-dtypes come with JAX.
PACKAGES=(
  "keras==3.15.1" "absl-py==2.5.1" "rich==15.0.0" "markdown-it-py==4.3.0" "mdurl==0.1.2"
  "pygments==2.21.0" "namex==0.1.0" "optree==0.20.0" "packaging==26.4"
  "h5py==3.14.0" "pillow==13.0.0"
)
# Python versions whose binary wheels (h5py, Pillow, optree) --fetch-wheels downloads.
FETCH_PYTHON_VERSIONS=(3.11 3.12 3.13)

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --data) DATA=${2:?--data needs a folder}; shift 2 ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --fetch-wheels) FETCH_DIR=${2:?--fetch-wheels needs a folder}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    *) echo "error: unknown argument '$1'; see 'bash bench/gpu.sh --help'" >&2; exit 2 ;;
  esac
done

# Absolute, because the benchmark's children run with another working folder.
case $SITE in
  /*) ;;
  *) SITE=$PWD/$SITE ;;
esac

run() {
  printf '+ %s\n' "$*" >&2
  if [[ $DRY_RUN -eq 0 ]]; then
    "$@"
  fi
}

if [[ -n $FETCH_DIR ]]; then
  # Pure-Python wheels are the same for every version; binary ones are not.
  for version in "${FETCH_PYTHON_VERSIONS[@]}"; do
    run "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
      --python-version "$version" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --dest "$FETCH_DIR" "${PACKAGES[@]}"
  done
  exit 0
fi

if [[ $DRY_RUN -eq 0 ]]; then
  if ! "$PYTHON" -c 'import jax, sys; sys.exit(0 if any(d.platform == "gpu" for d in jax.devices()) else 1)'; then
    echo "error: $PYTHON has no JAX with a GPU device; install jax[cuda12] or set PYTHON to an interpreter that has it" >&2
    exit 1
  fi
fi

install() {
  run "$PYTHON" -m pip install --quiet --no-deps --upgrade --target "$SITE" "$@" "${PACKAGES[@]}"
}

if [[ ! -d $SITE/keras ]]; then
  # Try the index first with a short timeout, then the local wheels.
  if ! install --timeout 15 --retries 0; then
    if [[ ! -d $WHEELS ]]; then
      echo "error: PyPI is not reachable and the wheel folder $WHEELS does not exist; run 'bash bench/gpu.sh --fetch-wheels $WHEELS' on a machine with PyPI access and bring the folder" >&2
      exit 1
    fi
    install --no-index --find-links "$WHEELS"
  fi
fi

OUTPUT=${OUT:-docs}/benchmarks-gpu.md
DATA_ARGS=()
if [[ -n $DATA ]]; then
  DATA_ARGS=(--data "$DATA")
fi

export KERAS_BACKEND=jax
# Keep JAX from grabbing 75% of GPU memory up front in each child process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
run "$PYTHON" -m bench.gpu --output "$OUTPUT" "${DATA_ARGS[@]}" "${BENCH_ARGS[@]}"
