#!/usr/bin/env bash
# GPU check of the CUDA backend for one short GPU window (~10 minutes; ~5 when all is well),
# on a machine with an NVIDIA GPU and no Rust toolchain:
#
#   scripts/gpu-check.sh <demovlp-binary> <report-dir>
#
# <report-dir> receives exactly two files: gpu-check.json (one entry per check, failed or
# not: {"name", "ok", ...figures}) and gpu-check-<UTC time>.tar.gz (everything: every
# command's stdout/stderr, the selftest JSON lines, the sanitizer log, replay tensors'
# comparisons, bench outputs, nvidia-smi samples, and a copy of gpu-check.json). Every
# check is recorded, failed or not; the exit status is 0 only if every check passed.
#
# The binary must be built with `cargo build --release --features cuda` (it opens the CUDA
# libraries at run time). The fixtures travel with the script (`testdata/` next to it or one
# level up, as in the repository), and so does `bench/pytorch_baseline.py`.
#
# Sections, in order (each a function `section_<name>`; GPU_CHECK_SECTIONS="a,b" runs a subset):
#   libraries  the CUDA libraries the binary actually opened (paths from /proc/self/maps) and
#              their versions: driver, NVRTC, cuBLAS, cuBLASLt; libnccl; nvidia-smi
#   selftest   every selftest case in its own process (DEMOVLP_CUDA_SYNC=1: an error names its
#              kernel; a crash costs one case), fp32 on cuBLASLt; then one process each for bf16
#              and for fp32 on plain cuBLAS (names prefixed "bf16 " / "cublas ")
#   sanitizer  compute-sanitizer memcheck of `selftest --quick` (kernels at small shapes)
#   replays    `replay` of every fixture on the GPU vs the CPU replay and the recording
#   benches    `bench train-step` at the fine-tuning shape (B 32, 8 x 30, text 100) and the
#              pre-training shape (B 128, 1 x 30), fp32 and bf16, with the GPU memory peak
#              (nvidia-smi sampled); `bench embed`; `bench eval-sims --n 1000`; `bench extract`
#              (one detector frame on the device and the CPU); NCCL all-reduce
#   training   the same short fine-tuning run (the quick demo's corpus and model, 30 steps,
#              dropout off) on the CPU and on the device through the one training loop:
#              losses per step within 1e-3 (fp32) and 5e-2 (bf16, the band it must stay in),
#              then the same for finetune-qa (the demo corpus's questions, fp32), then 2 ranks
#              over NCCL on the one GPU against accumulate_steps = 2 (NCCL may refuse two
#              ranks on one device: recorded as it answers)
#   pytorch    bench/pytorch_baseline.py --bench on the GPU at the same shapes, fp32 and bf16
#              autocast (torch.cuda peak memory and the nvidia-smi peak), then one
#              "side by side" entry per shape and precision: steps/s of both, ratios, peaks
# To add a section: write `section_<name>()` with the helpers below (`record`, `limit`,
# `over_budget`, `run_logged`, `gpu_mem_start`/`gpu_mem_stop`) and add <name> to SECTIONS.
#
# Environment: GPU_CHECK_DEVICE=cpu runs the same logic on the CPU (a dry run: the CPU is
# compared with itself, the benches at tiny shapes); GPU_CHECK_BUDGET_S (default 540) bounds
# the whole run (checks that no longer fit are recorded as skipped); GPU_CHECK_CASES, a
# grep -E pattern over the selftest case ids, narrows the per-case pass.
set -u
BIN=${1:?usage: gpu-check.sh <demovlp-binary> <report-dir>}
REPORT=${2:?usage: gpu-check.sh <demovlp-binary> <report-dir>}
HERE=$(cd "$(dirname "$0")" && pwd)
case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
mkdir -p "$REPORT"
REPORT=$(cd "$REPORT" && pwd)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
CHECKS="$WORK/checks.jsonl"
LOG="$WORK/gpu-check.log"
: >"$CHECKS"
: >"$LOG"
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}
DEV=${GPU_CHECK_DEVICE:-cuda}
SECTIONS=(libraries selftest sanitizer replays training benches pytorch)
[ -n "${GPU_CHECK_SECTIONS:-}" ] && IFS=, read -r -a SECTIONS <<<"$GPU_CHECK_SECTIONS"
export RUST_BACKTRACE=1
# The kernels compiled once (NVRTC's cache), shared by every process of this run.
OWN_CACHE=""
if [ -z "${DEMOVLP_CUDA_CACHE:-}" ]; then OWN_CACHE="$WORK/nvrtc-cache"; export DEMOVLP_CUDA_CACHE="$OWN_CACHE"; fi

if [ -d "$HERE/testdata" ]; then TESTDATA="$HERE/testdata"; elif [ -d "$HERE/../testdata" ]; then TESTDATA=$(cd "$HERE/../testdata" && pwd); else TESTDATA=""; fi
if [ -f "$HERE/bench/pytorch_baseline.py" ]; then TORCH_SCRIPT="$HERE/bench/pytorch_baseline.py"; else TORCH_SCRIPT="$HERE/../bench/pytorch_baseline.py"; fi
COMPARE="$HERE/compare_safetensors.py"
PY=$(command -v python3 || command -v python || true)

# ---- helpers ----------------------------------------------------------------------------
json_str() { # a JSON string literal of $1
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/ }
  s=${s//$'\r'/}
  printf '"%s"' "$s"
}
record() { # name ok(true|false) [extra JSON members without braces]
  local extra=${3:-}
  printf '{"name": %s, "ok": %s%s}\n' "$(json_str "$1")" "$2" "${extra:+, $extra}" >>"$CHECKS"
  echo "[$(elapsed) s] $1: ok=$2 ${extra:0:300}" | tee -a "$LOG" >&2
}
elapsed() { echo $(( $(date +%s) - T0 )); }
over_budget() { [ $((BUDGET - $(elapsed))) -lt 10 ]; }
limit() { # the smaller of $1 seconds and what is left of the budget
  local left=$((BUDGET - $(elapsed)))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
skip_if_over() { # name: records the check as skipped when the budget is spent
  if over_budget; then record "$1" false "\"status\": \"skipped\", \"detail\": \"skipped: time budget spent\""; return 0; fi
  return 1
}
tail_of() { tail -c 1500 "$1" 2>/dev/null; }
run_logged() { # stem timeout cmd...: stdout to $WORK/stem.out, stderr to $WORK/stem.err; the exit status
  local stem=$1 to=$2
  shift 2
  mkdir -p "$(dirname "$WORK/$stem")"
  timeout "$(limit "$to")" "$@" >"$WORK/$stem.out" 2>"$WORK/$stem.err"
}
last_json() { grep '^{' "$1" 2>/dev/null | tail -1; }
GPU_MEM_PID=""
gpu_mem_start() { # samples the GPU's used memory every 100 ms into $WORK/$1.smi
  GPU_MEM_FILE="$WORK/$1.smi"
  : >"$GPU_MEM_FILE"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$GPU_MEM_FILE" 2>/dev/null &
    GPU_MEM_PID=$!
  fi
}
gpu_mem_stop() { # prints the peak MiB sampled (null without nvidia-smi)
  if [ -n "$GPU_MEM_PID" ]; then kill "$GPU_MEM_PID" 2>/dev/null; wait "$GPU_MEM_PID" 2>/dev/null; GPU_MEM_PID=""; fi
  local peak
  peak=$(awk 'BEGIN {m = -1} $1 + 0 > m {m = $1 + 0} END {if (m >= 0) print m}' "$GPU_MEM_FILE" 2>/dev/null)
  echo "${peak:-null}"
}
DRY=false
[ "$DEV" = cpu ] && DRY=true

# ---- libraries --------------------------------------------------------------------------
# Libraries carried along (the machine may have no network): a `cuda-libs/` folder next to
# the script, e.g. made elsewhere with
#   pip install --target cuda-libs nvidia-cuda-nvrtc-cu12 nvidia-cublas-cu12 nvidia-nccl-cu12
# (its nvidia/*/lib folders), then the Python wheels installed here, then the system's.
LIBDIRS=()
for lib in "$HERE"/cuda-libs/nvidia/*/lib "$HERE"/cuda-libs/lib; do [ -d "$lib" ] && LIBDIRS+=("$lib"); done
if [ -n "$PY" ]; then
  while IFS= read -r d; do
    for lib in "$d"/nvidia/*/lib; do [ -d "$lib" ] && LIBDIRS+=("$lib"); done
  done < <("$PY" -c 'import site, sys
dirs = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()] + sys.path
print("\n".join(sorted(set(d for d in dirs if d))))' 2>/dev/null)
fi
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64; do
  [ -d "$d" ] && LIBDIRS+=("$d")
done
for d in "${LIBDIRS[@]}"; do LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"; done
export LD_LIBRARY_PATH
find_lib() { # prints the first file matching $1* on LD_LIBRARY_PATH or in ldconfig's cache
  local IFS=:
  for d in $LD_LIBRARY_PATH; do
    for f in "$d"/$1*; do [ -e "$f" ] && { echo "$f"; return 0; }; done
  done
  ldconfig -p 2>/dev/null | awk -v n="$1" '$1 ~ "^"n {print $NF; exit}'
}
# The NCCL bench opens libnccl.so; the nvidia-nccl-cu12 wheel has only libnccl.so.2: link it.
nccl=$(find_lib libnccl.so)
case "$nccl" in
  */libnccl.so | "") ;;
  *)
    mkdir -p "$WORK/nccl-lib" && ln -sf "$nccl" "$WORK/nccl-lib/libnccl.so"
    export LD_LIBRARY_PATH="$WORK/nccl-lib:$LD_LIBRARY_PATH" ;;
esac

section_libraries() {
  if [ ! -x "$BIN" ]; then record "binary" false "\"detail\": $(json_str "$BIN is not an executable")"; fi
  # What the binary opens: `selftest --libraries` initialises the driver, NVRTC, cuBLAS and
  # cuBLASLt, reports their versions and the files mapped into the process.
  run_logged libraries/selftest-libraries 60 "$BIN" selftest --libraries --device "$DEV"
  local rc=$? line
  line=$(last_json "$WORK/libraries/selftest-libraries.out")
  if [ -n "$line" ]; then
    echo "$line" >>"$CHECKS"
    echo "[$(elapsed) s] libraries: ${line:0:300}" | tee -a "$LOG" >&2
  else
    record "libraries" false "\"exit\": $rc, \"detail\": $(json_str "$(tail_of "$WORK/libraries/selftest-libraries.err")")"
  fi
  local p
  p=$(find_lib libnccl.so)
  if [ -n "$p" ]; then
    record "libnccl" true "\"path\": $(json_str "$(readlink -f "$p")")"
  else
    record "libnccl" false "\"detail\": \"libnccl.so(.2) not found (pip install nvidia-nccl-cu12 into cuda-libs/)\""
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi >"$WORK/libraries/nvidia-smi.txt" 2>&1
    local smi
    smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv,noheader 2>&1 | head -4)
    record "nvidia-smi" true "\"gpus\": $(json_str "$smi"), \"ld_library_path\": $(json_str "$LD_LIBRARY_PATH")"
  else
    record "nvidia-smi" false "\"detail\": \"nvidia-smi not found: no NVIDIA driver on this machine?\", \"ld_library_path\": $(json_str "$LD_LIBRARY_PATH")"
  fi
}

# ---- selftest ---------------------------------------------------------------------------
selftest_lines() { # file prefix: appends the file's JSON lines to the checks (names prefixed); prints their count
  local n=0 line
  while IFS= read -r line; do
    case "$line" in
      \{*) echo "${line/\"name\":\"/\"name\":\"$2}" >>"$CHECKS"; n=$((n + 1)) ;;
    esac
  done <"$1"
  echo "$n"
}
section_selftest() {
  mkdir -p "$WORK/selftest"
  if ! "$BIN" selftest --list >"$WORK/selftest/list.txt" 2>"$WORK/selftest/list.err"; then
    record "selftest --list" false "\"detail\": $(json_str "$(tail_of "$WORK/selftest/list.err")")"
    return
  fi
  local ids id name rc n t cases=0 bad=0
  ids=$(cut -f1 "$WORK/selftest/list.txt")
  [ -n "${GPU_CHECK_CASES:-}" ] && ids=$(echo "$ids" | grep -E "$GPU_CHECK_CASES")
  for id in $ids; do
    name=$(awk -F'\t' -v id="$id" '$1 == id {print $2}' "$WORK/selftest/list.txt")
    if skip_if_over "$name"; then continue; fi
    t=$(date +%s)
    DEMOVLP_CUDA_SYNC=1 run_logged "selftest/$id" 60 "$BIN" selftest --device "$DEV" --precision fp32 --case "$id"
    rc=$?
    # The case's verdict line (the summary line is left out: one entry per case).
    grep '^{' "$WORK/selftest/$id.out" | grep -v '"name":"selftest"[,}]' >"$WORK/selftest/$id.case" || true
    n=$(selftest_lines "$WORK/selftest/$id.case" "")
    cases=$((cases + 1))
    if [ "$n" -eq 0 ]; then
      # No verdict: the process died (abort, segfault, timeout) inside the case.
      bad=$((bad + 1))
      record "$name" false "\"status\": \"crashed\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - t )), \"detail\": $(json_str "$(tail_of "$WORK/selftest/$id.err")")"
    fi
  done
  echo "[$(elapsed) s] selftest: $cases cases in their own processes, $bad without a verdict" | tee -a "$LOG" >&2
  # Then all cases in one process each for bf16 (bf16 GEMM inputs: looser tolerances) and
  # for fp32 on plain cuBLAS (the fallback when cuBLASLt has no algorithm or is missing).
  # (The dry run leaves out the published-shape cases there: they ran above.)
  local quick=()
  $DRY && quick=(--quick)
  selftest_pass "bf16 " selftest-bf16 150 "" --precision bf16 --tol 3e-2 --model-tol 1e-1 "${quick[@]}"
  selftest_pass "cublas " selftest-cublas 150 DEMOVLP_CUDA_GEMM=cublas --precision fp32 "${quick[@]}"
}
selftest_pass() { # prefix stem timeout env-assignment args...
  local prefix=$1 stem=$2 to=$3 envset=$4
  shift 4
  if skip_if_over "${prefix}selftest"; then return; fi
  local t rc n
  t=$(date +%s)
  env $envset timeout "$(limit "$to")" "$BIN" selftest --device "$DEV" "$@" >"$WORK/selftest/$stem.out" 2>"$WORK/selftest/$stem.err"
  rc=$?
  n=$(selftest_lines "$WORK/selftest/$stem.out" "$prefix")
  if [ "$n" -eq 0 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; }; then
    record "${prefix}selftest (exit $rc)" false "\"seconds\": $(( $(date +%s) - t )), \"detail\": $(json_str "$(tail_of "$WORK/selftest/$stem.err")")"
  fi
  echo "[$(elapsed) s] ${prefix}selftest: exit $rc, $n lines" | tee -a "$LOG" >&2
}

# ---- sanitizer --------------------------------------------------------------------------
section_sanitizer() {
  local name="compute-sanitizer memcheck: selftest --quick"
  if skip_if_over "$name"; then return; fi
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$cs" ]; then
    record "$name" false "\"status\": \"skipped\", \"detail\": \"compute-sanitizer not found (CUDA toolkit's bin/)\""
    return
  fi
  mkdir -p "$WORK/sanitizer"
  local t rc errors
  t=$(date +%s)
  timeout "$(limit 120)" "$cs" --tool memcheck --print-limit 100 --log-file "$WORK/sanitizer/memcheck.log" \
    "$BIN" selftest --device "$DEV" --quick >"$WORK/sanitizer/selftest.out" 2>"$WORK/sanitizer/selftest.err"
  rc=$?
  errors=$(grep -o 'ERROR SUMMARY: [0-9]*' "$WORK/sanitizer/memcheck.log" 2>/dev/null | awk '{print $3}' | tail -1)
  local ok=false
  [ "$rc" -eq 0 ] && [ "${errors:-x}" = 0 ] && ok=true
  record "$name" "$ok" "\"exit\": $rc, \"errors\": ${errors:-null}, \"seconds\": $(( $(date +%s) - t )), \"detail\": $(json_str "$(grep -m 5 -A 3 '^=========' "$WORK/sanitizer/memcheck.log" 2>/dev/null | head -40)")"
}

# ---- replays ----------------------------------------------------------------------------
# fixture  text-heads video-heads  tolerance vs the recording (the CLI tests')  AdamW step
# (qa_tiny is the QA model: towers + BUTD head; replay offers no AdamW step for it)
FIXTURES="model_tiny.safetensors 4 4 4e-4 adamw
model_tiny_1frame.safetensors 3 2 3e-5 adamw
qa_tiny.safetensors 4 4 3e-5 none"
section_replays() {
  local fx th vh tol step
  while read -r fx th vh tol step; do
    replay_fixture "$fx" "$th" "$vh" "$tol" "$step"
  done <<<"$FIXTURES"
}
replay_fixture() {
  local fx=$1 th=$2 vh=$3 tol=$4 step=$5
  local name="replay $fx fp32"
  if skip_if_over "$name"; then return; fi
  if [ -z "$TESTDATA" ] || [ ! -f "$TESTDATA/$fx" ]; then record "$name" false "\"detail\": \"fixture not found (testdata/ next to the script)\""; return; fi
  local work="$WORK/replay-${fx%.safetensors}" adamw="" t rc secs
  mkdir -p "$work"
  if [ -n "$PY" ] && [ "$step" = adamw ]; then
    adamw=$("$PY" -c 'import json, struct, sys
f = open(sys.argv[1], "rb"); n = struct.unpack("<Q", f.read(8))[0]
a = json.loads(json.loads(f.read(n))["__metadata__"]["config"])["adamw"]
print(",".join(str(a[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")))' "$TESTDATA/$fx" 2>/dev/null)
  fi
  local adamw_args=()
  [ -n "$adamw" ] && adamw_args=(--adamw "$adamw")
  t=$(date +%s)
  if ! timeout "$(limit 60)" "$BIN" import "$TESTDATA/$fx" --out "$work/model" --key-prefix param. --text-heads "$th" --video-heads "$vh" >"$work/import.log" 2>&1; then
    record "$name" false "\"detail\": $(json_str "import failed: $(tail_of "$work/import.log")")"; return
  fi
  timeout "$(limit 60)" "$BIN" replay --model "$work/model" --batch "$TESTDATA/$fx" --out "$work/cpu.safetensors" --grads "${adamw_args[@]}" --device cpu >"$work/cpu.log" 2>&1
  timeout "$(limit 120)" "$BIN" replay --model "$work/model" --batch "$TESTDATA/$fx" --out "$work/dev.safetensors" --grads "${adamw_args[@]}" --device "$DEV" --precision fp32 >"$work/dev.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t ))
  if [ "$rc" -ne 0 ]; then record "$name" false "\"seconds\": $secs, \"detail\": $(json_str "replay --device $DEV exit $rc: $(tail_of "$work/dev.log")")"; return; fi
  if [ -z "$PY" ]; then record "$name" false "\"seconds\": $secs, \"detail\": \"replayed; no python3 to compare the tensors\""; return; fi
  local vs_cpu vs_rec ok
  vs_cpu=$("$PY" "$COMPARE" "$work/dev.safetensors" "$work/cpu.safetensors" 2>&1)
  vs_rec=$("$PY" "$COMPARE" "$work/dev.safetensors" "$TESTDATA/$fx" out. grad. 2>&1)
  # The tensors stay out of the archive (the comparisons are what matters; they are large).
  rm -rf "$work/model" "$work/cpu.safetensors" "$work/dev.safetensors"
  ok=$("$PY" -c 'import json, sys
c, r, tol = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
num = lambda x: float("inf") if x == "inf" else x
ok = all(num(c.get(k, {}).get("max_rel_err", 0.0)) <= 1e-3 for k in ("out", "grad", "after_adamw")) and all(num(r[k]["max_rel_err"]) <= 2 * tol for k in ("out", "grad")) and not r["missing"]
print("true" if ok else "false")' "$vs_cpu" "$vs_rec" "$tol" 2>/dev/null || echo false)
  record "$name" "$ok" "\"seconds\": $secs, \"tolerance_vs_recording\": $tol, \"vs_cpu\": $(echo "$vs_cpu" | grep '^{' | tail -1 || echo null), \"vs_recording\": $(echo "$vs_rec" | grep '^{' | tail -1 || echo null)"
}

# ---- benches ----------------------------------------------------------------------------
# The published shapes on a GPU; tiny ones in the dry run (the plumbing, not the speed).
if $DRY; then
  SHAPE_FT="--batch 2 --frames 1 --regions 4 --text-len 8"; SHAPE_PT="--batch 3 --frames 1 --regions 4 --text-len 8"; RUNS=1; EVAL_N=40
else
  SHAPE_FT="--batch 32 --frames 8 --regions 30 --text-len 100"; SHAPE_PT="--batch 128 --frames 1 --regions 30 --text-len 100"; RUNS=3; EVAL_N=1000
fi
bench() { # name stem timeout args...: one check from the bench's last JSON line, with the sampled GPU memory peak
  local name=$1 stem=$2 to=$3
  shift 3
  if skip_if_over "$name"; then return; fi
  local t rc last peak
  t=$(date +%s)
  gpu_mem_start "benches/$stem"
  run_logged "benches/$stem" "$to" "$BIN" "$@" --json
  rc=$?
  peak=$(gpu_mem_stop)
  last=$(last_json "$WORK/benches/$stem.out")
  if [ "$rc" -eq 0 ] && [ -n "$last" ]; then
    record "$name" true "\"seconds\": $(( $(date +%s) - t )), \"gpu_memory_peak_mib\": $peak, \"result\": $last"
  else
    record "$name" false "\"seconds\": $(( $(date +%s) - t )), \"exit\": $rc, \"detail\": $(json_str "$(tail_of "$WORK/benches/$stem.err")")"
  fi
}
section_benches() {
  mkdir -p "$WORK/benches"
  local prec
  for prec in fp32 bf16; do
    # shellcheck disable=SC2086
    bench "bench train-step B32 F8 R30 L100 $prec" "train-ft-$prec" 90 bench train-step $SHAPE_FT --runs "$RUNS" --pytorch never --device "$DEV" --precision "$prec"
    # shellcheck disable=SC2086
    bench "bench train-step B128 F1 R30 L100 $prec" "train-pt-$prec" 90 bench train-step $SHAPE_PT --runs "$RUNS" --pytorch never --device "$DEV" --precision "$prec"
  done
  for prec in fp32 bf16; do
    # shellcheck disable=SC2086
    bench "bench embed B32 F8 R30 L100 $prec" "embed-$prec" 60 bench embed $SHAPE_FT --runs "$RUNS" --device "$DEV" --precision "$prec"
  done
  bench "bench eval-sims n$EVAL_N" eval-sims 90 bench eval-sims --n "$EVAL_N" --runs 2 --baseline-runs 0 --pytorch never --device "$DEV"
  # The region-feature detector: one frame at the default scale on the device, and the same
  # frame on the CPU (vs_cpu: largest feature difference, proposals, selection). The dry run:
  # the reduced test network.
  local xsize=""
  $DRY && xsize="--tiny"
  # shellcheck disable=SC2086
  bench "bench extract $([ -n "$xsize" ] && echo tiny || echo 600x1000)" extract 150 bench extract $xsize --runs 2 --pytorch never --device "$DEV"
  # Data-parallel collectives: two ranks (threads with a communicator each) on this GPU; the
  # bench checks the sum. Recent NCCL refuses two ranks on one GPU unless told.
  if ! $DRY; then
    NCCL_MULTI_RANK_GPU_ENABLE=1 bench "bench allreduce nccl 2 ranks published" allreduce-nccl 90 bench allreduce --engine nccl --world 2 --runs 3
  fi
}

# ---- pytorch ----------------------------------------------------------------------------
section_pytorch() {
  mkdir -p "$WORK/pytorch"
  local name="pytorch baseline"
  if [ -z "$PY" ] || ! "$PY" -c 'import torch' >"$WORK/pytorch/import.log" 2>&1; then
    record "$name" false "\"status\": \"skipped\", \"detail\": $(json_str "python3 with torch not available: $(tail_of "$WORK/pytorch/import.log")")"
  elif [ ! -f "$TORCH_SCRIPT" ]; then
    record "$name" false "\"detail\": \"bench/pytorch_baseline.py not found next to the script\""
  else
    pytorch_benches
  fi
  side_by_side
}
pytorch_benches() {
  local tdev=cuda shape prec stem label t rc last peak name args
  $DRY && tdev=cpu
  for shape in ft pt; do
    for prec in fp32 bf16; do
      if [ "$shape" = ft ]; then label="B32 F8 R30 L100"; args=$SHAPE_FT; else label="B128 F1 R30 L100"; args=$SHAPE_PT; fi
      stem="torch-$shape-$prec"
      name="pytorch train-step $label $prec"
      if skip_if_over "$name"; then continue; fi
      t=$(date +%s)
      gpu_mem_start "pytorch/$stem"
      # shellcheck disable=SC2086
      run_logged "pytorch/$stem" 120 "$PY" "$TORCH_SCRIPT" --bench $args --runs "$RUNS" --device "$tdev" --precision "$prec" --json
      rc=$?
      peak=$(gpu_mem_stop)
      last=$(last_json "$WORK/pytorch/$stem.out")
      if [ "$rc" -eq 0 ] && [ -n "$last" ]; then
        record "$name" true "\"seconds\": $(( $(date +%s) - t )), \"gpu_memory_peak_mib\": $peak, \"result\": $last"
      else
        record "$name" false "\"seconds\": $(( $(date +%s) - t )), \"exit\": $rc, \"detail\": $(json_str "$(tail_of "$WORK/pytorch/$stem.err")")"
      fi
    done
  done
}
side_by_side() { # ours and PyTorch's at each shape and precision (same card, same run)
  if [ -z "$PY" ]; then record "side by side" false "\"detail\": \"no python3\""; return; fi
  "$PY" - "$CHECKS" >"$WORK/pytorch/side-by-side.jsonl" 2>"$WORK/pytorch/side-by-side.err" <<'EOF'
import json, sys
checks = {}
for line in open(sys.argv[1]):
    try:
        c = json.loads(line)
    except ValueError:
        continue
    checks[c["name"]] = c
for label in ("B32 F8 R30 L100", "B128 F1 R30 L100"):
    for prec in ("fp32", "bf16"):
        ours, torch = checks.get(f"bench train-step {label} {prec}"), checks.get(f"pytorch train-step {label} {prec}")
        out = {"name": f"side by side train-step {label} {prec}", "ok": False}
        if ours and torch and ours["ok"] and torch["ok"]:
            o, t = ours["result"], torch["result"]
            out.update(ok=True, ours_median_s=o["median_s"], pytorch_median_s=t["median_s"],
                       speedup_vs_pytorch=round(t["median_s"] / o["median_s"], 3),
                       ours_gpu_memory_peak_mib=ours.get("gpu_memory_peak_mib"),
                       pytorch_gpu_memory_peak_mib=torch.get("gpu_memory_peak_mib"),
                       pytorch_max_memory_allocated_mib=t.get("cuda_max_memory_allocated_mib"))
        else:
            out["detail"] = "one side missing or failed: " + ", ".join(
                f"{n}: {'missing' if c is None else ('ok' if c['ok'] else 'failed')}" for n, c in (("ours", ours), ("pytorch", torch)))
        print(json.dumps(out))
EOF
  cat "$WORK/pytorch/side-by-side.jsonl" >>"$CHECKS"
}

# ---- training ---------------------------------------------------------------------------
# A run config derived from the demo's fine-tuning config (`python3 -c`: tomllib reads it, a
# small writer writes it back with the changes).
derive_config() { # src dst output_dir key=value...
  "$PY" - "$@" <<'EOF_PY'
import sys, tomllib
src, dst, out, *sets = sys.argv[1:]
cfg = tomllib.load(open(src, "rb"))
cfg["output_dir"] = out
for kv in sets:
    k, v = kv.split("=", 1)
    sec, key = k.split(".")
    cfg.setdefault(sec, {})[key] = tomllib.loads(f"v = {v}")["v"]
def val(v):
    if isinstance(v, bool): return "true" if v else "false"
    if isinstance(v, (int, float)): return repr(v)
    if isinstance(v, str): return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list): return "[" + ", ".join(val(x) for x in v) + "]"
    raise SystemExit(f"cannot write {v!r}")
def table(path, d, out):
    simple = {k: v for k, v in d.items() if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
    if path and simple: out.append(f"[{path}]")
    out += [f"{k} = {val(v)}" for k, v in simple.items()]
    for k, v in d.items():
        p = f"{path}.{k}" if path else k
        if isinstance(v, dict): table(p, v, out)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{p}]]"); out += [f"{a} = {val(b)}" for a, b in item.items()]
lines = []
table("", cfg, lines)
open(dst, "w").write("\n".join(lines) + "\n")
EOF_PY
}
step_losses() { # log.jsonl: one line "step loss" per logged step
  "$PY" -c 'import json, sys
for l in open(sys.argv[1]):
    v = json.loads(l)
    if v.get("kind") == "step": print(v["step"], v["loss"])' "$1"
}
compare_losses() { # name ref.log dev.log tolerance: records the worst relative difference per step
  local name=$1 a=$2 b=$3 tol=$4
  local r
  r=$("$PY" - "$a" "$b" "$tol" <<'EOF_PY'
import json, sys
def losses(p):
    return {v["step"]: v["loss"] for v in map(json.loads, open(p)) if v.get("kind") == "step"}
a, b, tol = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3])
steps = sorted(set(a) & set(b))
worst = max(((abs(a[s] - b[s]) / max(abs(a[s]), 1e-6), s) for s in steps), default=(float("inf"), None))
print(json.dumps({"steps": len(steps), "steps_ref": len(a), "steps_dev": len(b), "max_rel_diff": worst[0], "worst_step": worst[1],
                  "tolerance": tol, "ok": len(steps) == len(a) == len(b) > 0 and worst[0] <= tol,
                  "first_losses": [[s, a[s], b[s]] for s in steps[:5]]}))
EOF_PY
)
  local ok=false
  case "$r" in *'"ok": true'*) ok=true ;; esac
  record "$name" "$ok" "\"comparison\": ${r:-null}"
}
section_training() {
  local W="$WORK/training" name
  mkdir -p "$W"
  if [ -z "$PY" ] || ! "$PY" -c 'import tomllib' 2>/dev/null; then
    record "training" false "\"detail\": \"python3 >= 3.11 (tomllib) is needed to derive the run configs\""; return
  fi
  skip_if_over "training: demo corpus" && return
  if ! run_logged training/demo 300 "$BIN" demo --quick --out "$W/demo" --quiet; then
    record "training: demo corpus" false "\"detail\": $(json_str "$(tail_of "$WORK/training/demo.err")")"; return
  fi
  local src init
  src=$(grep -l 'use_local = true' "$W"/demo/*_model/train_config.toml 2>/dev/null | head -1)
  init=$(dirname "$src")
  if [ -z "$src" ]; then record "training: demo corpus" false "\"detail\": \"no *_model/train_config.toml with use_local = true\""; return; fi
  record "training: demo corpus" true "\"config\": $(json_str "$src")"
  # 30 steps (8 in the dry run, which only exercises the section's logic).
  local steps=30 rank_steps=10
  $DRY && steps=8 && rank_steps=4
  local sets=(train.max_steps=$steps train.text_dropout=0.0 train.log_every=1 train.checkpoint_every=0 train.epochs=100)
  derive_config "$src" "$W/cpu.toml" "$W/cpu" "${sets[@]}"
  name="training: finetune $steps steps --device cpu"
  skip_if_over "$name" && return
  if ! run_logged training/cpu 240 "$BIN" finetune --config "$W/cpu.toml" --init "$init" --device cpu; then
    record "$name" false "\"detail\": $(json_str "$(tail_of "$WORK/training/cpu.err")")"; return
  fi
  record "$name" true "\"result\": $(last_json "$WORK/training/cpu.out" || echo null)"
  local prec tol
  for prec in fp32 bf16; do
    [ "$prec" = fp32 ] && tol=1e-3 || tol=5e-2
    name="training: finetune $steps steps --device $DEV --precision $prec vs cpu"
    skip_if_over "$name" && continue
    derive_config "$src" "$W/$prec.toml" "$W/$prec" "${sets[@]}"
    gpu_mem_start "training/$prec"
    run_logged "training/$prec" 240 "$BIN" finetune --config "$W/$prec.toml" --init "$init" --device "$DEV" --precision "$prec"
    local rc=$? peak
    peak=$(gpu_mem_stop)
    if [ "$rc" -ne 0 ]; then record "$name" false "\"exit\": $rc, \"detail\": $(json_str "$(tail_of "$WORK/training/$prec.err")")"; continue; fi
    compare_losses "$name" "$W/cpu/log.jsonl" "$W/$prec/log.jsonl" "$tol"
    sed -i '$ s/}$/, "gpu_memory_peak_mib": '"$peak"'}/' "$CHECKS"
  done
  # QA: the demo corpus's questions (`demo --out` writes them and qa_finetune.toml), from the
  # demo's model, the same steps on the CPU and on the device (fp32).
  local qsrc="$W/demo/qa_finetune.toml"
  name="training: finetune-qa $steps steps --device cpu"
  if [ ! -f "$qsrc" ]; then
    record "$name" false "\"detail\": \"demo --out wrote no qa_finetune.toml\""
  elif ! skip_if_over "$name"; then
    local qsets=(train.max_steps=$steps train.text_dropout=0.0 train.attention_dropout=false train.log_every=1 train.checkpoint_every=0)
    derive_config "$qsrc" "$W/qa_cpu.toml" "$W/qa_cpu" "${qsets[@]}"
    derive_config "$qsrc" "$W/qa_dev.toml" "$W/qa_dev" "${qsets[@]}"
    if ! run_logged training/qa_cpu 240 "$BIN" finetune-qa --config "$W/qa_cpu.toml" --device cpu; then
      record "$name" false "\"detail\": $(json_str "$(tail_of "$WORK/training/qa_cpu.err")")"
    else
      record "$name" true "\"result\": $(last_json "$WORK/training/qa_cpu.out" || echo null)"
      name="training: finetune-qa $steps steps --device $DEV --precision fp32 vs cpu"
      if ! skip_if_over "$name"; then
        gpu_mem_start "training/qa_dev"
        run_logged training/qa_dev 240 "$BIN" finetune-qa --config "$W/qa_dev.toml" --device "$DEV" --precision fp32
        local qrc=$? qpeak
        qpeak=$(gpu_mem_stop)
        if [ "$qrc" -ne 0 ]; then
          record "$name" false "\"exit\": $qrc, \"detail\": $(json_str "$(tail_of "$WORK/training/qa_dev.err")")"
        else
          compare_losses "$name" "$W/qa_cpu/log.jsonl" "$W/qa_dev/log.jsonl" 1e-3
          sed -i '$ s/}$/, "gpu_memory_peak_mib": '"$qpeak"'}/' "$CHECKS"
        fi
      fi
    fi
  fi
  # Two ranks (NCCL on the GPU; TCP in the dry run) against one process accumulating 2 parts.
  local engine=nccl
  $DRY && engine=tcp
  name="training: 2 ranks ($engine) vs accumulate_steps = 2"
  skip_if_over "$name" && return
  derive_config "$src" "$W/acc2.toml" "$W/acc2" "${sets[@]}" train.accumulate_steps=2 train.max_steps=$rank_steps
  derive_config "$src" "$W/ranks.toml" "$W/ranks" "${sets[@]}" train.max_steps=$rank_steps
  if ! run_logged training/acc2 240 "$BIN" finetune --config "$W/acc2.toml" --init "$init" --device "$DEV"; then
    record "$name" false "\"detail\": $(json_str "accumulate_steps = 2: $(tail_of "$WORK/training/acc2.err")")"; return
  fi
  local port=$((29600 + RANDOM % 1000)) r pids=()
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port timeout "$(limit 240)" \
      "$BIN" finetune --config "$W/ranks.toml" --init "$init" --device "$DEV" --dist-engine "$engine" \
      >"$W/rank$r.out" 2>"$W/rank$r.err" &
    pids+=($!)
  done
  local rcs=""
  for r in 0 1; do wait "${pids[$r]}"; rcs="$rcs $?"; done
  local a b
  a=$(last_json "$WORK/training/acc2.out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["params_hash"])' 2>/dev/null)
  b=$(last_json "$W/rank0.out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["params_hash"])' 2>/dev/null)
  if [ "$rcs" != " 0 0" ]; then
    record "$name" false "\"exits\": $(json_str "$rcs"), \"detail\": $(json_str "rank 0: $(tail_of "$W/rank0.err") | rank 1: $(tail_of "$W/rank1.err")")"
  else
    compare_losses "$name (losses)" "$W/acc2/log.jsonl" "$W/ranks/log.jsonl" 1e-5
    record "$name (parameters)" "$([ -n "$a" ] && [ "$a" = "$b" ] && echo true || echo false)" "\"accumulate_hash\": $(json_str "$a"), \"ranks_hash\": $(json_str "$b"), \"note\": \"equal bits expected on the CPU; on a GPU the all-reduce order of NCCL may differ in the last bits\""
  fi
}

# ---- run, then one archive and one summary ----------------------------------------------
for s in "${SECTIONS[@]}"; do
  if ! declare -F "section_$s" >/dev/null; then record "section $s" false "\"detail\": \"no such section\""; continue; fi
  echo "[$(elapsed) s] section $s" | tee -a "$LOG" >&2
  "section_$s"
done

total=$(grep -c '^{' "$CHECKS")
failed=$(grep -c '"ok": *false' "$CHECKS")
SUMMARY="$WORK/gpu-check.json"
{
  printf '{"script": "gpu-check.sh", "device": %s, "binary": %s, "started": %s, "seconds": %s, "archive": %s, "checks_total": %s, "checks_failed": %s, "checks": [\n' \
    "$(json_str "$DEV")" "$(json_str "$BIN")" "$(json_str "$STAMP")" "$(elapsed)" "$(json_str "gpu-check-$STAMP.tar.gz")" "$total" "$failed"
  sep=""
  while IFS= read -r line; do printf '%s%s' "$sep" "$line"; sep=$',\n'; done <"$CHECKS"
  printf '\n]}\n'
} >"$SUMMARY"
echo "wrote $REPORT/gpu-check.json: $total checks, $failed failed, $(elapsed) s" | tee -a "$LOG" >&2
[ -n "$OWN_CACHE" ] && rm -rf "$OWN_CACHE"
rm -rf "$WORK/nccl-lib"
tar -czf "$REPORT/gpu-check-$STAMP.tar.gz" -C "$(dirname "$WORK")" --transform "s|^$(basename "$WORK")|gpu-check-$STAMP|" "$(basename "$WORK")"
cp "$SUMMARY" "$REPORT/gpu-check.json"
rm -rf "$WORK"
[ "$failed" -eq 0 ]
