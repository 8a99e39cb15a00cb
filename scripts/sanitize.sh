#!/usr/bin/env bash
# AddressSanitizer + UBSan run of the native fuzz driver (`npm run fuzz:asan`).
#
# Builds the CPU-only addon with -DADAFISHER_SANITIZE=ON into build-asan/ (never the shared
# build/), then runs test/workers/fuzz-driver.mjs against exactly that binary
# (ADAFISHER_ADDON: the loader then tries nothing else) with the ASan runtime preloaded.
# ADAFISHER_FUZZ_BACKEND=cuda instead builds the addon with the CUDA backend compiled for
# the CUDA host emulator (test/cuda-emulator) into build-asan-cuda-emulator/ and fuzzes the
# cuda backend: the CUDA backend's host code and kernels, instrumented.
#
# NOTE: [sanitizing an addon]
# node itself is not instrumented, so the ASan runtime must be loaded before anything else
# (LD_PRELOAD): the addon's instrumented code then checks every access it makes, including
# into memory V8 hands it (typed array backing stores allocated by node's malloc, which ASan
# intercepts). Options, and why:
#   detect_leaks=0           LeakSanitizer would report what node/V8 deliberately never free
#                            at exit (isolate, snapshot, per-process tables), none of it ours.
#                            Addon leaks are measured instead by test/reliability-leaks.test.ts
#                            (liveAllocations back to baseline, RSS bounded).
#   allocator_may_return_null=1  the fuzzer asks for buffers of 2^39+ floats on purpose; they
#                            must fail as ADAFISHER_OUT_OF_MEMORY, not abort the run.
#   halt_on_error=1, exitcode=86 (ASan) / 87 (UBSan): the first report ends the run with a
#                            code of its own (1 is the driver's "JS-level findings").
# UBSan is built with -fno-sanitize-recover=undefined: the first report aborts too.
set -euo pipefail
cd "$(dirname "$0")/.."

CALLS="${ADAFISHER_FUZZ_CALLS:-20000}"
BACKEND="${ADAFISHER_FUZZ_BACKEND:-cpu}"
SEED="${ADAFISHER_FUZZ_SEED:-20261128}"  # fixed by default: CI is repeatable
[ "$SEED" = random ] && SEED=$(date +%s)

case "$BACKEND" in
  cpu) BUILD=build-asan; FLAGS=(--CDADAFISHER_CUDA=OFF) ;;
  cuda) BUILD=build-asan-cuda-emulator; FLAGS=(--CDADAFISHER_CUDA_EMULATOR=ON) ;;
  *) echo "sanitize: ADAFISHER_FUZZ_BACKEND must be cpu or cuda, not '$BACKEND'" >&2; exit 2 ;;
esac
node node_modules/cmake-js/bin/cmake-js compile --out "$BUILD" --CDADAFISHER_SANITIZE=ON "${FLAGS[@]}"
ADDON="$PWD/$BUILD/Release/adafisher.node"

# The driver imports the compiled loader (dist/lib/binding.js).
if [ ! -f dist/lib/binding.js ] || [ lib/binding.ts -nt dist/lib/binding.js ]; then
  node node_modules/typescript/bin/tsc -p tsconfig.json || true
fi

LIBASAN="$(${CXX:-g++} -print-file-name=libasan.so)"
LIBUBSAN="$(${CXX:-g++} -print-file-name=libubsan.so)"
if [ ! -e "$LIBASAN" ]; then echo "sanitize: libasan.so not found (${CXX:-g++} -print-file-name)" >&2; exit 1; fi

LOG="$BUILD/fuzz-$SEED.log"
REPORT="$BUILD/fuzz-$SEED.json"
echo "sanitize: fuzzing $ADDON ($BACKEND backend), $CALLS calls, seed $SEED (inputs logged to $LOG)"
set +e
env LD_PRELOAD="$LIBASAN $LIBUBSAN" \
  ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:exitcode=86:print_summary=1" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87" \
  ADAFISHER_ADDON="$ADDON" ADAFISHER_BACKEND="$BACKEND" \
  node --expose-gc test/workers/fuzz-driver.mjs --calls "$CALLS" --seed "$SEED" --log "$LOG" --backend "$BACKEND" "$@" >"$REPORT"
rc=$?
set -e
if [ $rc -eq 0 ]; then
  echo "sanitize: $(tail -n 1 "$REPORT")"
  echo "sanitize: no sanitizer reports, no findings"
  exit 0
fi
if [ $rc -eq 1 ] && node -e 'const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").pop()); process.exit(r.findings.length ? 0 : 1)' "$REPORT" 2>/dev/null; then
  echo "sanitize: no sanitizer reports, but the fuzzer found wrong results or error classes:" >&2
  node -e 'const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").pop()); for (const f of r.findings) console.error(`  ${f.count}x ${f.signature}\n     e.g. ${f.example}`)' "$REPORT"
  exit 1
fi
echo "sanitize: FAILED (exit $rc: a sanitizer report or a crash, above); the call being made:" >&2
tail -n 1 "$LOG" >&2 || true
echo "replay: ADAFISHER_FUZZ_BACKEND=$BACKEND ADAFISHER_FUZZ_SEED=$SEED ADAFISHER_FUZZ_CALLS=$CALLS npm run fuzz:asan" >&2
exit $rc
