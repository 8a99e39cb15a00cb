#!/usr/bin/env bash
# The CUDA backend's own source, run and checked without a GPU (`npm run test:cuda-emulator`).
#
# cuda/*.cu is compiled as C++ for the CUDA host emulator (test/cuda-emulator/README.md):
# every kernel, launcher, table upload, stream and error path of the CUDA backend runs on
# the CPU, each CUDA thread on a fiber. Three checks, each against the same source that
# nvcc compiles for the GPU:
#   1. the whole vitest suite with ADAFISHER_BACKEND=cuda on the emulated addon (golden
#      replays, the float64 reference, DeviceBuffers, TF.js adapter, fuzzing, leaks,
#      workers, out-of-memory), threads and blocks started in reverse order, device memory
#      closed to host code (ADAFISHER_CUDA_EMULATOR_PROTECT=1);
#   2. the parity harness (test/native, CUDA backend vs CPU backend, every Backend method)
#      and the emulator's self-test under AddressSanitizer + UBSan + LeakSanitizer: threads
#      started forward with malloc'ed device memory (ASan checks every kernel access), then
#      reversed with device memory closed to host code;
#   3. 20,000 fuzzed calls into the emulated cuda backend under ASan + UBSan
#      (ADAFISHER_FUZZ_BACKEND=cuda scripts/sanitize.sh).
# What it cannot show: anything of the real device (timing, memory model between blocks,
# device intrinsics' rounding, the compiled PTX/SASS). scripts/gpu-check.sh does that on a GPU.
#
#   bash scripts/cuda-emulator.sh [vitest-json-report-path]
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-}
fail=0
# Closing device memory to host code is one register write per switch with memory-protection
# keys, and an mprotect of every live page without them (too slow for the leak test).
PROTECT=1
if ! grep -qw pku /proc/cpuinfo 2> /dev/null; then
  PROTECT=0
  echo "cuda-emulator: this CPU has no memory-protection keys (pku): device memory stays open to host code"
fi
step() { echo; echo "--- cuda-emulator: $* ---"; }

step "build the addon with the CUDA backend compiled for the emulator (build-cuda-emulator/)"
mkdir -p build-cuda-emulator
node node_modules/cmake-js/bin/cmake-js compile --out build-cuda-emulator --CDADAFISHER_CUDA_EMULATOR=ON > build-cuda-emulator/build.log 2>&1 ||
  { tail -40 build-cuda-emulator/build.log; echo "cuda-emulator: addon build FAILED"; exit 1; }
node node_modules/typescript/bin/tsc -p tsconfig.json || exit 1
ADDON=$PWD/build-cuda-emulator/Release/adafisher.node
ADAFISHER_ADDON=$ADDON node dist/lib/cli.js info || exit 1

step "1. vitest, ADAFISHER_BACKEND=cuda on the emulated addon"
args=(run)
[ -n "$REPORT" ] && args+=(--reporter=default --reporter=json "--outputFile=$REPORT")
ADAFISHER_ADDON=$ADDON ADAFISHER_BACKEND=cuda ADAFISHER_CUDA_EMULATOR_ORDER=reverse ADAFISHER_CUDA_EMULATOR_PROTECT=$PROTECT \
  node node_modules/vitest/vitest.mjs "${args[@]}" || fail=1

step "2. parity harness, CUDA vs CPU backend, under ASan + UBSan + LSan"
HARNESS=build-cuda-emulator-harness
mkdir -p "$HARNESS"
{ cmake -S test/native -B "$HARNESS" -DADAFISHER_CUDA_EMULATOR=ON -DADAFISHER_SANITIZE=ON > "$HARNESS/build.log" 2>&1 &&
  cmake --build "$HARNESS" -j"$(nproc)" >> "$HARNESS/build.log" 2>&1; } ||
  { tail -40 "$HARNESS/build.log"; echo "cuda-emulator: harness build FAILED"; exit 1; }
for run in "forward 0" "reverse $PROTECT"; do
  read -r order protect <<< "$run"
  for exe in cuda_emulator_self_test cuda_parity; do
    log="$HARNESS/$exe-$order.log"
    if ADAFISHER_CUDA_EMULATOR_ORDER=$order ADAFISHER_CUDA_EMULATOR_PROTECT=$protect ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 \
      UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 "$HARNESS/$exe" > "$log" 2>&1; then
      echo "$exe ($order, protect=$protect): $(grep '^summary' "$log")"
    else
      grep -v '^PASS' "$log" | tail -40
      echo "$exe ($order, protect=$protect): FAILED"
      fail=1
    fi
  done
done

step "3. fuzzing the emulated cuda backend under ASan + UBSan"
ADAFISHER_FUZZ_BACKEND=cuda bash scripts/sanitize.sh || fail=1

echo
if ((fail)); then echo "cuda-emulator: FAILED"; else echo "cuda-emulator: all checks passed"; fi
exit $fail
