#!/usr/bin/env bash
# Every GPU figure and check in one call, each step under its own time limit; a failing or
# timed-out step is recorded and the session goes on. Writes under $OUT:
#   session.log    each step's exit code and seconds, nvidia-smi before and after
#   results.jsonl  one JSON record per step (benchmarks/device/steps.py)
#   logs.tgz       each step's full output
# then `python -m benchmarks.device.splice $OUT/results.jsonl` puts the figures into
# BENCHMARKS.md (`make bench-gpu` does both).
#
#   OUT=runs/bench-gpu BUDGET_S=3600 bash benchmarks/device/gpu_session.sh [--smoke]
#
# BUDGET_S (default 3600) is the whole session's wall-clock budget: a step's limit is its own
# cap or what is left, whichever is less, and a step is skipped once under 20 s are left.
# STEPS="overhead packing" runs only the steps named. Steps are in priority order (figures, correctness, memory, torch.compile, the test files).
set -u
OUT=${OUT:-runs/bench-gpu}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-3600}
SMOKE=${1:-}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
start=$(date +%s)
log() { echo "$*" | tee -a "$OUT/session.log"; }

log "session start $(date -Is); budget ${BUDGET_S}s; python $PY; smoke '${SMOKE}'"
# Ray's own executables (gcs_server, raylet) must be executable. A Ray unpacked by a tool
# that drops permission bits (Python's zipfile: seen 2026-12-04 with the device bundle, where
# every Ray step then failed with PermissionError on gcs_server) gets them back here.
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/session.log"
import importlib.util, os, stat
spec = importlib.util.find_spec("ray")
if spec and spec.submodule_search_locations:
    root = os.path.join(list(spec.submodule_search_locations)[0], "core", "src", "ray")
    for rel in ("gcs/gcs_server", "raylet/raylet"):
        path = os.path.join(root, rel)
        if os.path.isfile(path) and not os.access(path, os.X_OK):
            os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            print(f"made {path} executable (its permission bits were lost)")
PYEOF
nvidia-smi >>"$OUT/session.log" 2>&1 || log "nvidia-smi: not available"

step() {  # step NAME CAP_S ARGS...  (ARGS go to benchmarks.device.steps)
  local name=$1 cap=$2; shift 2
  if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then return; fi
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  if (( left < 20 )); then log "SKIP $name (only ${left}s left)"; return; fi
  local limit=$(( cap < left ? cap : left ))
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$PY" -m benchmarks.device.steps "$@" --out "$OUT" $SMOKE \
    >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  log "step $name rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s)$( ((rc == 124)) && echo ' TIMED OUT')"
  tail -n 3 "$OUT/logs/$name.log" | sed 's/^/    /' | tee -a "$OUT/session.log"
}

step env 60 env
step overhead 150 overhead
step fastpath_resnet50 100 fastpath --backbone resnet50
step fastpath_efficientnet_b0 100 fastpath --backbone efficientnet_b0
step packing 150 packing
step cache 100 cache
step amp 100 amp
step heads_cuda 100 heads_cuda
step memory 120 memory
step compile_resnet50 180 compile --backbone resnet50
step compile_efficientnet_b0 180 compile --backbone efficientnet_b0
step trainables_tests 240 trainables_tests

nvidia-smi --query-gpu=name,memory.used,clocks.sm,temperature.gpu --format=csv \
  >>"$OUT/session.log" 2>&1 || true
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
log "session end $(date -Is); $(( $(date +%s) - start ))s"
