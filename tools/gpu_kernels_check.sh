#!/usr/bin/env bash
# One command for the GPU machine: GPU kernel tests, then the kernel benchmark.
#   bash tools/gpu_kernels_check.sh            # logs to stdout (and under $OUT when set)
#   BENCH_ARGS=--sweep bash tools/gpu_kernels_check.sh   # also sweep the FP4 decode tiles
#   SKIP_TESTS=1 / SKIP_BENCH=1                 # run only one half
# Exit status: non-zero if the tests or the benchmark failed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
logs="${OUT:-}"
[ -n "$logs" ] && mkdir -p "$logs"
py="${PYTHON:-python3}"

# homeseek.kernels maps to kernels/ only through the installed package; without an install,
# build a symlink shim (no network or pip needed).
if ! "$py" -c "import homeseek.kernels.ops" 2>/dev/null; then
    shim="$(mktemp -d)"
    mkdir -p "$shim/homeseek"
    for f in "$repo"/homeseek/*; do ln -s "$f" "$shim/homeseek/"; done
    ln -sfn "$repo/kernels" "$shim/homeseek/kernels"
    ln -sfn "$repo/graphs" "$shim/homeseek/graphs"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

run() {  # run NAME CMD...: tee to $OUT/NAME.log when $OUT is set
    local name="$1"
    shift
    echo "== $name: $*"
    if [ -n "$logs" ]; then
        "$@" 2>&1 | tee "$logs/$name.log"
    else
        "$@" 2>&1
    fi
    return "${PIPESTATUS[0]}"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | if [ -n "$logs" ]; then tee "$logs/env.log"; else cat; fi

rc_test=0
if [ -z "${SKIP_TESTS:-}" ]; then
    run gpu_kernels_pytest "$py" -m pytest -m gpu tests/test_kernels.py -v -rs --durations=15
    rc_test=$?
fi
rc_bench=0
if [ -z "${SKIP_BENCH:-}" ]; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a word list
    run bench_kernels "$py" tools/bench_kernels.py ${BENCH_ARGS:-}
    rc_bench=$?
    if [ -n "$logs" ]; then
        tail -n 1 "$logs/bench_kernels.log" > "$logs/bench_kernels.json"
    fi
fi
echo "== tests rc=$rc_test bench rc=$rc_bench"
[ "$rc_test" -eq 0 ] && [ "$rc_bench" -eq 0 ]
