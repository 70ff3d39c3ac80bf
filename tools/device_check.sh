#!/usr/bin/env bash
# One command for a CUDA machine without network: homeseek runs from the checkout (no pip needed),
# then run the GPU tests, the expert-copy benchmark, the routing simulation on the full-size
# synthetic model, and the kernel check. Logs go under $OUT when set (else ./device-logs).
#   bash tools/device_check.sh [engine|decode|graphs|kernels|doctor|generate|copy|routing|bench|floor|e2e ...]
#   (default: engine kernels doctor copy routing bench; BENCH_ARGS=--sweep adds tile sweeps;
#   PYTEST_ARGS="-n 8" runs the GPU tests in parallel when pytest-xdist is there)
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
logs="${OUT:-$repo/device-logs}"
mkdir -p "$logs"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# Wheels carried along (pytest on images that lack it), installed into a private target.
if ls .whl/*.whl >/dev/null 2>&1 && ! "$py" -c "import pytest, xdist" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/hs-site .whl/*.whl
    export PYTHONPATH="/tmp/hs-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The checkout imports as the installed package does (homeseek/kernels and homeseek/graphs are
# symlinks to the top-level folders), so the repo root on PYTHONPATH is all homeseek needs.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2206  # PYTEST_ARGS is a word list
pt=("$py" -m pytest -p no:cacheprovider --rootdir "$repo" -c "$repo/pyproject.toml" ${PYTEST_ARGS:-})
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(engine kernels doctor copy routing bench)
rc=0
step() {  # step NAME SECONDS CMD...
    local name="$1" secs="$2"
    shift 2
    echo "== $name: $*"
    timeout "$secs" "$@" 2>&1 | tee "$logs/$name.log"
    local r=${PIPESTATUS[0]}
    echo "== $name rc=$r"
    [ "$r" -eq 0 ] || rc=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$logs/env.log"
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$logs/env.log"
for p in "${parts[@]}"; do
    case "$p" in
    engine) step gpu_engine 240 "${pt[@]}" -q -m gpu "$repo/tests/test_gpu_engine.py" ;;
    decode) step gpu_decode 300 "${pt[@]}" -q -m gpu -rs "$repo/tests/test_gpu_decode.py" ;;
    graphs) step gpu_graphs 180 "${pt[@]}" -q -m gpu -rs "$repo/tests/test_graphs.py" ;;
    kernels) step gpu_kernels 400 "${pt[@]}" -q -m gpu -rs "$repo/tests/test_kernels.py" ;;
    doctor) step doctor 60 "$py" -m homeseek doctor ;;
    generate) step generate 120 "$py" -m homeseek generate --model tiny --device cuda \
        --max-tokens 32 --temperature 0 --json "Hello" ;;
    copy) step expert_copy 120 "$py" "$repo/tools/expert_copy_bench.py" ;;
    routing) step routing_flash 300 "$py" "$repo/tools/routing_sim.py" --synthetic flash \
        --alias 64 --device cuda --tokens 4096 --chunk 1024 --gpu-mem-gb 24 ;;
    # shellcheck disable=SC2086  # BENCH_ARGS is a word list, e.g. BENCH_ARGS=--sweep
    bench) step bench_kernels 400 "$py" "$repo/tools/bench_kernels.py" ${BENCH_ARGS:-} ;;
    floor) step chain_floor 120 "$py" "$repo/tools/chain_floor.py" ;;
    # The end-to-end yardstick (homeseek bench); E2E_ARGS adds flags, E2E_SECS its time limit.
    # shellcheck disable=SC2086  # E2E_ARGS is a word list
    e2e) step "e2e${E2E_TAG:-}" "${E2E_SECS:-540}" "$py" -m homeseek bench ${E2E_ARGS:-} ;;
    esac
done
exit $rc
