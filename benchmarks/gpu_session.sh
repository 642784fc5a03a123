#!/usr/bin/env bash
# One GPU session's evidence in one call, most important first (see benchmarks/README.md, "GPU session"):
#   env        nvidia-smi (read-only queries), python/torch/triton versions, peers' wheels from .whl/ if carried
#   check      benchmarks/gpu_check.py: every Triton op vs its float64 reference, bf16/fp32, D 64/128, NaN-poisoned
#              outputs, two runs on the same inputs (a difference = race)
#   pytest     the -m gpu tests (tests/kernels, tests/models)
#   pytest_cuda  the kernel test files that move to CUDA when it is present (test_ssm.py, test_retrieval.py)
#   kernels titans titans_layers mom ssm longmem   the benchmarks, JSON into the output
# Each stage has its own timeout, shortened so the whole run ends inside $GPU_SESSION_BUDGET seconds (default 510);
# a stage that fails or times out does not stop the next.  Stages that no longer fit are skipped.
# $GPU_CHECK_ARGS is appended to the check's arguments (e.g. "--dims 128 --dtypes bf16" for a rerun).
#
#   benchmarks/gpu_session.sh                 run every stage (on the GPU machine, from the repository root;
#                                             MEMZOO_COMMIT=<hash> records the commit where no .git travelled)
#   benchmarks/gpu_session.sh --only check,kernels
#   benchmarks/gpu_session.sh --list          print the stages and their commands
#   benchmarks/gpu_session.sh --dry-run       on any machine: check that every command exists and parses
#
# Output (at most 8 files, as the device tool brings back): $OUT (default ./gpu-out) gets summary.txt, env.txt,
# gpu_check.json, results.tgz (the benchmarks' JSON), logs.tgz (every stage's log), refreshed after each stage.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
WORK=${GPU_SESSION_WORK:-/tmp/memzoo-gpu-session}
BUDGET=${GPU_SESSION_BUDGET:-510}
PY=${PYTHON:-python3}
MODE=run
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --list) MODE=list ;;
    --only) ONLY=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $1 (--dry-run, --list, --only STAGES)" >&2; exit 2 ;;
  esac
  shift
done

# name|cap in seconds|command (run from the repository root)
STAGES=(
  "env|30|stage_env"
  "check|150|$PY benchmarks/gpu_check.py --jobs 5 --json $WORK/gpu_check.json ${GPU_CHECK_ARGS:-}"
  "pytest|60|$PY -m pytest -m gpu tests/kernels tests/models -x -q -p no:cacheprovider --continue-on-collection-errors"
  "pytest_cuda|45|$PY -m pytest tests/kernels/test_ssm.py tests/kernels/test_retrieval.py -q -p no:cacheprovider"
  "kernels|60|$PY benchmarks/kernels.py"
  "titans|45|$PY benchmarks/titans.py"
  "titans_layers|30|$PY benchmarks/titans.py --layers"
  "mom|40|$PY benchmarks/mom.py"
  "ssm|20|$PY benchmarks/ssm.py"
  "longmem|30|$PY benchmarks/longmem.py"
)
# what --dry-run runs instead (cheap, on the CPU): each command's --help, or a listing
DRY=(
  "env|60|$PY -c 'import torch, triton, memzoo.kernels; print(torch.__version__, triton.__version__)'"
  "check|60|$PY benchmarks/gpu_check.py --list --jobs 5"
  "pytest|120|$PY -m pytest -m gpu tests/kernels tests/models -q -p no:cacheprovider --collect-only"
  "pytest_cuda|120|$PY -m pytest tests/kernels/test_ssm.py tests/kernels/test_retrieval.py -q -p no:cacheprovider --collect-only"
  "kernels|30|$PY benchmarks/kernels.py --help"
  "titans|30|$PY benchmarks/titans.py --help"
  "titans_layers|30|$PY benchmarks/titans.py --help"
  "mom|30|$PY benchmarks/mom.py --help"
  "ssm|30|$PY benchmarks/ssm.py --help"
  "longmem|30|$PY benchmarks/longmem.py --help"
)

stage_env() {
  # read-only queries only: never change clocks, power, compute mode or MIG, never reset
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,utilization.gpu --format=csv
  nvidia-smi
  uname -a
  nproc
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "WHEEL INSTALL FAILED"
  else
    echo "no .whl/ carried: peers (fla, titans-pytorch) absent"
  fi
  $PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for m in ("triton", "einops", "fla", "titans_pytorch", "flash_attn", "numpy", "pytest", "hypothesis"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "installed"))
    except Exception as e:
        print(m, "ABSENT", type(e).__name__, str(e)[:120])
import memzoo.kernels  # the working tree's package imports under this torch/triton
print("memzoo", memzoo.kernels.__file__)
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count, "mem_GiB",
      round(p.total_memory / 2**30, 1), "L2_MB", round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
EOF
}

pack() {  # refresh the tarballs under $OUT (the device tool returns at most 8 files)
  tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
  tar -czf "$OUT/results.tgz" -C "$WORK" results 2>/dev/null
  cp "$WORK/logs/env.log" "$OUT/env.txt" 2>/dev/null
  cp "$WORK/summary.txt" "$OUT/summary.txt" 2>/dev/null
}

mkdir -p "$OUT"
if [ "$MODE" = dry ]; then
  WORK=$(mktemp -d)
  STAGES=("${DRY[@]}")
fi
mkdir -p "$WORK/logs" "$WORK/results"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MEMZOO_RESULTS_DIR=$WORK/results
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
if [ "$MODE" = run ]; then
  unset TRITON_INTERPRET
  export PYTHONPATH=$PYTHONPATH:/tmp/site   # where stage env installs the carried wheels
fi

if [ "$MODE" = list ]; then
  for s in "${STAGES[@]}"; do IFS='|' read -r name cap cmd <<<"$s"; printf '%-14s %4ss  %s\n' "$name" "$cap" "$cmd"; done
  exit 0
fi

start=$(date +%s)
rc_all=0
printf '%-14s %-8s %6s  %s\n' stage status seconds note > "$WORK/summary.txt"
for s in "${STAGES[@]}"; do
  IFS='|' read -r name cap cmd <<<"$s"
  if [ -n "$ONLY" ] && [[ ",$ONLY,env," != *",$name,"* ]]; then continue; fi
  left=$(( BUDGET - ($(date +%s) - start) - 10 ))
  t=$(( cap < left ? cap : left ))
  log=$WORK/logs/$name.log
  if [ "$t" -lt 15 ]; then
    printf '%-14s %-8s %6s  %s\n' "$name" SKIP 0 "no time left in ${BUDGET}s" >> "$WORK/summary.txt"
    continue
  fi
  echo "=== $name (timeout ${t}s): $cmd"
  t0=$(date +%s)
  if [ "$name" = env ] && [ "$MODE" = run ]; then
    export -f stage_env; export PY
    timeout -k 5 "$t" bash -c stage_env > "$log" 2>&1
  else
    timeout -k 5 "$t" bash -c "$cmd" > "$log" 2>&1
  fi
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  case $rc in 0) st=ok ;; 124|137) st=TIMEOUT ;; *) st="FAIL($rc)" ;; esac
  [ $rc -ne 0 ] && rc_all=1
  # the stage's last informative line
  note=$(grep -E "passed|failed|error|cases pass|wrote|Error|ABSENT|FAILED" "$log" | tail -1 | cut -c1-90)
  [ -z "$note" ] && note=$(tail -1 "$log" | cut -c1-90)
  printf '%-14s %-8s %6s  %s\n' "$name" "$st" "$dt" "$note" >> "$WORK/summary.txt"
  if [ "$name" = check ] && [ "$MODE" = run ]; then   # merge what the workers wrote, also after a timeout
    $PY benchmarks/gpu_check.py --merge --json "$WORK/gpu_check.json" >> "$log" 2>&1
    cp "$WORK/gpu_check.json" "$OUT/gpu_check.json" 2>/dev/null
    note=$(grep "cases pass" "$log" | tail -1 | cut -c1-90)
    sed -i '$d' "$WORK/summary.txt"; printf '%-14s %-8s %6s  %s\n' "$name" "$st" "$dt" "$note" >> "$WORK/summary.txt"
  fi
  [ "$MODE" = run ] && pack
done

if [ "$MODE" = dry ]; then
  # what the device call would carry: the working tree (tracked + untracked-not-ignored) and .whl, 64 MiB in all
  tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  whl=$(du -sb .whl 2>/dev/null | cut -f1); whl=${whl:-0}
  echo "working tree ${tree} B + .whl ${whl} B = $(( (tree + whl) / 1048576 )) MiB (limit 64 MiB)" | tee -a "$WORK/summary.txt"
  [ $(( tree + whl )) -ge 67108864 ] && rc_all=1
  for tool in nvidia-smi timeout tar; do
    command -v $tool >/dev/null || echo "note: $tool not on this machine's PATH (needed on the GPU machine)" | tee -a "$WORK/summary.txt"
  done
fi

echo
echo "=== failing or slow correctness cases (gpu_check)"
grep -E "^(FAIL|ERROR)" "$WORK/logs/check.log" 2>/dev/null | cut -c1-160 | head -25
echo "=== pytest failures"
grep -E "^(FAILED|ERROR)" "$WORK/logs/pytest.log" "$WORK/logs/pytest_cuda.log" 2>/dev/null | cut -c1-160 | head -15
echo "=== benchmark tables (last lines)"
for b in kernels titans titans_layers mom ssm longmem; do
  [ -f "$WORK/logs/$b.log" ] && [ "$MODE" = run ] && { echo "--- $b"; grep -v "^wrote" "$WORK/logs/$b.log" | tail -8 | cut -c1-160; }
done
echo "=== summary (mode $MODE, $(( $(date +%s) - start ))s, logs in $WORK/logs, output in $OUT)"
cat "$WORK/summary.txt"
[ "$MODE" = run ] && pack
exit $rc_all
