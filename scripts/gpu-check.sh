#!/usr/bin/env bash
# GPU check of the CUDA backend, for a machine with an NVIDIA GPU and no Rust toolchain.
#
#   scripts/gpu-check.sh <demovlp-binary> <report-dir>
#
# (GPU_CHECK_DEVICE=cpu GPU_CHECK_BUDGET_S=20 runs the same checks on the CPU: a dry run.)
#
# The binary must be built with `cargo build --release --features cuda` (it opens the CUDA
# libraries at run time). The fixtures travel with the script: `testdata/` next to it (or
# one level up, as in the repository). In at most ~8 minutes it runs
#   1. the CUDA libraries: the system's or the `nvidia-*` Python wheels' (`lib` folders put
#      on LD_LIBRARY_PATH), and `nvidia-smi`;
#   2. `demovlp selftest --device cuda`: every kernel forward/backward against the CPU (one
#      verdict per kernel, not just the first failure: the fused retrieval losses and their
#      gradients at the loss fixtures' shapes, the device-drawn dropout masks bit for bit),
#      the whole-model comparison, and the evaluation scores (pair kernels) against the
#      CPU's blocked kernel (GEMMs by cuBLASLt); then the same in bf16 (names prefixed
#      "bf16 ", looser tolerances: bf16 GEMM inputs) and in fp32 on plain cuBLAS
#      (DEMOVLP_CUDA_GEMM=cublas, names prefixed "cublas ");
#   3. `replay` of every replayable fixture on the GPU in fp32, compared with the CPU replay
#      and with the recording (python3, standard library only: compare_safetensors.py);
#   4. `bench train-step --device cuda` at batch 32 x 8 x 30 regions x text 100 and
#      128 x 1 x 30, fp32 and bf16; `bench eval-sims --n 1000 --device "$DEV"` (its result
#      carries the GPU scores' difference from the CPU's on a 100 x 100 sub-square);
#      `bench embed` (texts/s, clips/s) at the fine-tuning shape in fp32 and bf16;
#   5. `bench allreduce --engine nccl --world 2`: the NCCL collective of data-parallel
#      training, two ranks on this GPU (sum checked, time of a published-size gradient),
#      beside the TCP engine;
# and writes <report-dir>/gpu-check.json: {"checks": [{"name", "ok", ...figures}, ...]}.
# Every check is recorded, failed or not; the exit status is 0 only if every check passed.
set -u
BIN=${1:?usage: gpu-check.sh <demovlp-binary> <report-dir>}
REPORT=${2:?usage: gpu-check.sh <demovlp-binary> <report-dir>}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$REPORT"
REPORT=$(cd "$REPORT" && pwd)
CHECKS="$REPORT/checks.jsonl"
LOG="$REPORT/gpu-check.log"
: >"$CHECKS"
: >"$LOG"
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
# A dry run of the script's own logic on any machine: GPU_CHECK_DEVICE=cpu (the checks then
# compare the CPU with itself; a small GPU_CHECK_BUDGET_S skips the slow benchmarks).
DEV=${GPU_CHECK_DEVICE:-cuda}
export RUST_BACKTRACE=0

if [ -d "$HERE/testdata" ]; then TESTDATA="$HERE/testdata"; elif [ -d "$HERE/../testdata" ]; then TESTDATA=$(cd "$HERE/../testdata" && pwd); else TESTDATA=""; fi
COMPARE="$HERE/compare_safetensors.py"
PY=$(command -v python3 || command -v python || true)

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
  echo "[$(( $(date +%s) - T0 )) s] $1: ok=$2 ${extra:0:300}" | tee -a "$LOG" >&2
}
elapsed() { echo $(( $(date +%s) - T0 )); }
over_budget() { [ $((BUDGET - $(elapsed))) -lt 10 ]; }
limit() { # the smaller of $1 seconds and what is left of the budget
  local left=$((BUDGET - $(elapsed)))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
tail_of() { tail -c 1500 "$1" 2>/dev/null; }

# ---- 1. libraries ---------------------------------------------------------------------
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
libs_ok=true
members=""
for l in libcuda.so libnvrtc.so libcublas.so libcublasLt.so; do
  p=$(find_lib "$l")
  [ -z "$p" ] && libs_ok=false
  members="$members$(json_str "$l"): $(json_str "${p:-missing}"), "
done
record "libraries" "$libs_ok" "${members}\"ld_library_path\": $(json_str "$LD_LIBRARY_PATH")"
if command -v nvidia-smi >/dev/null 2>&1; then
  smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -4)
  record "nvidia-smi" true "\"gpus\": $(json_str "$smi")"
else
  record "nvidia-smi" false "\"detail\": \"nvidia-smi not found: no NVIDIA driver on this machine?\""
fi
if [ ! -x "$BIN" ]; then
  record "binary" false "\"detail\": $(json_str "$BIN is not an executable")"
fi

# ---- 2. every kernel, then the whole model, against the CPU ---------------------------
out="$REPORT/selftest.jsonl"
t=$(date +%s)
timeout "$(limit 200)" "$BIN" selftest --device "$DEV" --precision fp32 >"$out" 2>"$REPORT/selftest.stderr"
rc=$?
lines=0
while IFS= read -r line; do
  case "$line" in
    \{*) echo "$line" >>"$CHECKS"; lines=$((lines + 1)) ;;
  esac
done <"$out"
if [ "$lines" -eq 0 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; }; then
  record "selftest (exit $rc)" false "\"seconds\": $(( $(date +%s) - t )), \"detail\": $(json_str "$(tail_of "$REPORT/selftest.stderr")")"
fi
echo "[$(elapsed) s] selftest: exit $rc, $lines checks" | tee -a "$LOG" >&2

# Again in bf16 (kernels without GEMMs keep fp32 parity, the others are bf16-close), and in
# fp32 with the GEMMs on plain cuBLAS (the fallback when cuBLASLt has no algorithm or is
# missing). Every line's name gets the pass's prefix.
selftest_pass() { # prefix file-stem timeout env-assignment args...
  local prefix=$1 stem=$2 to=$3 envset=$4
  shift 4
  if over_budget; then record "${prefix}selftest" false "\"detail\": \"skipped: time budget spent\""; return; fi
  local out="$REPORT/$stem.jsonl" t rc lines=0
  t=$(date +%s)
  env $envset timeout "$(limit "$to")" "$BIN" selftest --device "$DEV" "$@" >"$out" 2>"$REPORT/$stem.stderr"
  rc=$?
  while IFS= read -r line; do
    case "$line" in
      \{*) echo "${line/\"name\":\"/\"name\":\"$prefix}" >>"$CHECKS"; lines=$((lines + 1)) ;;
    esac
  done <"$out"
  if [ "$lines" -eq 0 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; }; then
    record "${prefix}selftest (exit $rc)" false "\"seconds\": $(( $(date +%s) - t )), \"detail\": $(json_str "$(tail_of "$REPORT/$stem.stderr")")"
  fi
  echo "[$(elapsed) s] ${prefix}selftest: exit $rc, $lines checks" | tee -a "$LOG" >&2
}
selftest_pass "bf16 " selftest-bf16 150 DEMOVLP_CUDA_GEMM=auto --precision bf16 --tol 3e-2 --model-tol 1e-1
selftest_pass "cublas " selftest-cublas 120 DEMOVLP_CUDA_GEMM=cublas --precision fp32

# ---- 3. replay of the fixtures on the GPU (fp32) --------------------------------------
# fixture  text-heads video-heads  tolerance vs the recording (the CLI tests')  AdamW step
# (qa_tiny is the QA model: towers + BUTD head; replay offers no AdamW step for it)
FIXTURES="model_tiny.safetensors 4 4 4e-4 adamw
model_tiny_1frame.safetensors 3 2 3e-5 adamw
qa_tiny.safetensors 4 4 3e-5 none"
while read -r fx th vh tol step; do
  name="replay $fx fp32"
  if over_budget; then record "$name" false "\"detail\": \"skipped: time budget spent\""; continue; fi
  if [ -z "$TESTDATA" ] || [ ! -f "$TESTDATA/$fx" ]; then record "$name" false "\"detail\": \"fixture not found (testdata/ next to the script)\""; continue; fi
  work="$REPORT/replay-${fx%.safetensors}"
  mkdir -p "$work"
  adamw=""
  if [ -n "$PY" ] && [ "$step" = adamw ]; then
    adamw=$("$PY" -c 'import json, struct, sys
f = open(sys.argv[1], "rb"); n = struct.unpack("<Q", f.read(8))[0]
a = json.loads(json.loads(f.read(n))["__metadata__"]["config"])["adamw"]
print(",".join(str(a[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")))' "$TESTDATA/$fx" 2>/dev/null)
  fi
  adamw_args=()
  [ -n "$adamw" ] && adamw_args=(--adamw "$adamw")
  t=$(date +%s)
  if ! timeout "$(limit 60)" "$BIN" import "$TESTDATA/$fx" --out "$work/model" --key-prefix param. --text-heads "$th" --video-heads "$vh" >"$work/import.log" 2>&1; then
    record "$name" false "\"detail\": $(json_str "import failed: $(tail_of "$work/import.log")")"; continue
  fi
  timeout "$(limit 60)" "$BIN" replay --model "$work/model" --batch "$TESTDATA/$fx" --out "$work/cpu.safetensors" --grads "${adamw_args[@]}" --device cpu >"$work/cpu.log" 2>&1
  timeout "$(limit 120)" "$BIN" replay --model "$work/model" --batch "$TESTDATA/$fx" --out "$work/cuda.safetensors" --grads "${adamw_args[@]}" --device "$DEV" --precision fp32 >"$work/cuda.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t ))
  if [ "$rc" -ne 0 ]; then record "$name" false "\"seconds\": $secs, \"detail\": $(json_str "replay --device $DEV exit $rc: $(tail_of "$work/cuda.log")")"; continue; fi
  if [ -z "$PY" ]; then record "$name" false "\"seconds\": $secs, \"detail\": \"replayed; no python3 to compare the tensors\""; continue; fi
  vs_cpu=$("$PY" "$COMPARE" "$work/cuda.safetensors" "$work/cpu.safetensors" 2>&1)
  vs_rec=$("$PY" "$COMPARE" "$work/cuda.safetensors" "$TESTDATA/$fx" out. grad. 2>&1)
  ok=$("$PY" -c 'import json, sys
c, r, tol = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
num = lambda x: float("inf") if x == "inf" else x
ok = all(num(c.get(k, {}).get("max_rel_err", 0.0)) <= 1e-3 for k in ("out", "grad", "after_adamw")) and all(num(r[k]["max_rel_err"]) <= 2 * tol for k in ("out", "grad")) and not r["missing"]
print("true" if ok else "false")' "$vs_cpu" "$vs_rec" "$tol" 2>/dev/null || echo false)
  record "$name" "$ok" "\"seconds\": $secs, \"tolerance_vs_recording\": $tol, \"vs_cpu\": ${vs_cpu:-null}, \"vs_recording\": ${vs_rec:-null}"
done <<<"$FIXTURES"

# ---- 4. benchmarks --------------------------------------------------------------------
bench() { # name timeout args...
  local name=$1 to=$2
  shift 2
  if over_budget; then record "$name" false "\"detail\": \"skipped: time budget spent\""; return; fi
  local t rc last
  t=$(date +%s)
  timeout "$(limit "$to")" "$BIN" "$@" --json >"$REPORT/bench.out" 2>"$REPORT/bench.err"
  rc=$?
  last=$(grep '^{' "$REPORT/bench.out" | tail -1)
  if [ "$rc" -eq 0 ] && [ -n "$last" ]; then
    record "$name" true "\"seconds\": $(( $(date +%s) - t )), \"result\": $last"
  else
    record "$name" false "\"seconds\": $(( $(date +%s) - t )), \"exit\": $rc, \"detail\": $(json_str "$(tail_of "$REPORT/bench.err")")"
  fi
}
for prec in fp32 bf16; do
  bench "bench train-step B32 F8 R30 L100 $prec" 90 bench train-step --batch 32 --frames 8 --regions 30 --text-len 100 --runs 3 --device "$DEV" --precision "$prec"
  bench "bench train-step B128 F1 R30 L100 $prec" 90 bench train-step --batch 128 --frames 1 --regions 30 --text-len 100 --runs 3 --device "$DEV" --precision "$prec"
done
bench "bench embed B32 F8 R30 L100 fp32" 60 bench embed --batch 32 --frames 8 --regions 30 --text-len 100 --runs 3 --device "$DEV" --precision fp32
bench "bench embed B32 F8 R30 L100 bf16" 60 bench embed --batch 32 --frames 8 --regions 30 --text-len 100 --runs 3 --device "$DEV" --precision bf16
bench "bench eval-sims n1000 cuda" 90 bench eval-sims --n 1000 --runs 2 --baseline-runs 0 --pytorch never --device "$DEV"

# ---- 5. data-parallel collectives: NCCL -------------------------------------------------
# Two ranks (threads with a communicator each) on this GPU; the bench checks the sum
# (every value 1 + 2) and times a published-size gradient, beside the TCP engine. Recent
# NCCL refuses two ranks on one GPU unless NCCL_MULTI_RANK_GPU_ENABLE=1. libnccl.so must
# be on LD_LIBRARY_PATH (the nvidia-nccl-cu12 wheel has only libnccl.so.2: link it).
# A 2-rank training run is not checked here: training runs on the CPU only for now, so
# the NCCL engine would only carry host gradients (what this check already exercises).
nccl=$(find_lib libnccl.so)
case "$nccl" in
  */libnccl.so) ;;
  ?*) # only a versioned name (the wheel's libnccl.so.2): give it the name cudarc opens
    mkdir -p "$REPORT/nccl-lib" && ln -sf "$nccl" "$REPORT/nccl-lib/libnccl.so"
    export LD_LIBRARY_PATH="$REPORT/nccl-lib:$LD_LIBRARY_PATH" ;;
  *) record "libnccl" false "\"detail\": \"libnccl.so(.2) not found (pip install nvidia-nccl-cu12 into cuda-libs/)\"" ;;
esac
NCCL_MULTI_RANK_GPU_ENABLE=1 bench "bench allreduce nccl 2 ranks published" 120 bench allreduce --engine nccl --world 2 --runs 3
bench "bench allreduce tcp 2 ranks published" 120 bench allreduce --engine tcp --world 2 --runs 3

# ---- report ---------------------------------------------------------------------------
total=$(grep -c '^{' "$CHECKS")
failed=$(grep -c '"ok": *false' "$CHECKS")
{
  printf '{"script": "gpu-check.sh", "binary": %s, "started": %s, "seconds": %s, "checks_total": %s, "checks_failed": %s, "checks": [\n' \
    "$(json_str "$BIN")" "$(json_str "$(date -u -d "@$T0" +%FT%TZ 2>/dev/null || echo "$T0")")" "$(elapsed)" "$total" "$failed"
  sep=""
  while IFS= read -r line; do printf '%s%s' "$sep" "$line"; sep=$',\n'; done <"$CHECKS"
  printf '\n]}\n'
} >"$REPORT/gpu-check.json"
echo "wrote $REPORT/gpu-check.json: $total checks, $failed failed, $(elapsed) s" | tee -a "$LOG" >&2
[ "$failed" -eq 0 ]
