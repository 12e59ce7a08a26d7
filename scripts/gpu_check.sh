#!/usr/bin/env bash
# One command for a GPU machine (one H100/H200 or more) with nothing but this repository:
# set up, run every gpu-marked test, run the GPU benchmarks, print one summary. Aims at
# 8 minutes on one card. Logs go to gpu-check/ (or $OUT when the caller gives one).
#
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-gpu-check}
mkdir -p "$LOG"
started=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - started ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/gpus.txt"
say "set-up"
FLOWRL_DEVICE=gpu bash scripts/setup.sh > "$LOG/setup.log" 2>&1
setup_rc=$?
say "set-up rc=$setup_rc"

PY=.venv/bin/python
status=0
if [ $setup_rc -eq 0 ]; then
  say "gpu tests"
  timeout 300 $PY -m pytest -m gpu -q -rs -s tests/integration/test_gpu.py > "$LOG/tests.log" 2>&1
  tests_rc=$?
  say "gpu tests rc=$tests_rc"
  say "benchmark: learner memory on CUDA"
  timeout 180 $PY benchmarks/learner_memory.py --device cuda --layers 4 \
      --lengths 1024 4096 8192 > "$LOG/learner_memory.log" 2>&1
  memory_rc=$?
  [ $tests_rc -eq 0 ] && [ $memory_rc -eq 0 ] || status=1
else
  tests_rc=skipped memory_rc=skipped
  status=1
fi

echo
echo "================ gpu_check summary ($(( $(date +%s) - started )) s) ================"
echo "card(s):        $(paste -sd ';' "$LOG/gpus.txt")"
echo "set-up:         rc=$setup_rc (log $LOG/setup.log)"
echo "gpu tests:      rc=$tests_rc: $(tail -n 1 "$LOG/tests.log" 2>/dev/null)"
grep -h "tok/s\|SKIPPED" "$LOG/tests.log" 2>/dev/null | sed 's/^/                /'
echo "learner memory: rc=$memory_rc"
tail -n 12 "$LOG/learner_memory.log" 2>/dev/null | sed 's/^/                /'
exit $status
