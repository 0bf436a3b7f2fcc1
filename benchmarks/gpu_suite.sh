#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build, compare the GPU with the warp emulator on the
# instruction probe (python -m fused_attn.emu probe), run the whole test suite on CUDA, run
# every benchmark, and write one report (device, versions, date) into benchmarks/results/.
# Uses the machine's own python3/torch/triton (no network needed); must finish in under
# 9 minutes on one H100. Set OUT to also copy the report and logs there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d-%H%M)
REPORT=benchmarks/results/gpu_report_${STAMP}.md
LOG=$(mktemp -d)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
: "${CUDA_HOME:=$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
export CUDA_HOME
t0=$(date +%s)
step() { echo "== $(date -u +%H:%M:%S) (+$(( $(date +%s) - t0 ))s) $*"; }

step "build (FUSED_ATTN_CUDA=1, MAX_JOBS=${MAX_JOBS:=16})"
export MAX_JOBS
FUSED_ATTN_CUDA=1 $PY -m pip install --no-deps --no-build-isolation -e . >"$LOG/build.log" 2>&1
build_rc=$?
tail -5 "$LOG/build.log"

step "environment"
$PY - <<'PY' | tee "$LOG/env.txt"
import torch, fused_attn
from fused_attn.tools import bench
d = torch.device("cuda")
for k, v in bench.environment(d).items():
    print(f"- {k}: {v}")
for k, v in fused_attn.available_backends().items():
    print(f"- backend {k}: {'usable' if v is None else v}")
PY

step "instruction probe: the GPU and the warp emulator, bit for bit"
timeout 60 $PY -m fused_attn.emu probe 2>&1 | tee "$LOG/probe.txt"
probe_rc=${PIPESTATUS[0]}

step "tests"
# the emulated kernels (cuda_emu, test_emulator.py) are CPU tests: make test runs them
timeout 300 $PY -m pytest -q -x -p no:cacheprovider -n 8 tests -m "not gate and not timed" -k "not cuda_emu" \
  --ignore=tests/test_emulator.py >"$LOG/tests.log" 2>&1
tests_rc=$?
tail -25 "$LOG/tests.log"

step "benchmarks"
bench_rc=0
for b in benchmarks/bench_*.py; do
  step "$b"
  timeout 240 $PY "$b" >"$LOG/$(basename "$b" .py).log" 2>&1 || bench_rc=$?
  tail -3 "$LOG/$(basename "$b" .py).log"
done

step "report"
{
  echo "# GPU suite report ${STAMP}"
  echo
  echo "build exit code: ${build_rc}; probe exit code: ${probe_rc}; tests exit code: ${tests_rc};" \
    "benchmarks exit code: ${bench_rc}"
  echo
  echo "## instruction probe (GPU vs warp emulator)"
  echo '```'
  tail -20 "$LOG/probe.txt"
  echo '```'
  echo
  cat "$LOG/env.txt"
  echo
  echo "## tests"
  echo '```'
  tail -40 "$LOG/tests.log"
  echo '```'
  for f in benchmarks/results/*_cuda_*.md; do
    [ -f "$f" ] && { echo; cat "$f"; }
  done
} >"$REPORT"
echo "wrote $REPORT"
if [ -n "${OUT:-}" ]; then
  cp "$REPORT" "$OUT/" 2>/dev/null
  tar czf "$OUT/gpu_logs.tgz" -C "$LOG" . 2>/dev/null
  tar czf "$OUT/results.tgz" benchmarks/results 2>/dev/null
fi
step "done"
[ $build_rc -eq 0 ] && [ $probe_rc -eq 0 ] && [ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
