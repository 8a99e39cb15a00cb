#!/usr/bin/env bash
# The one GPU check of this repository, run from the repository root on a lent GPU machine
# (CUDA 13, nvcc, cmake, python3 + PyTorch, compute-sanitizer; no Node.js, no network):
#
#   bash scripts/gpu-check.sh   # logs under out/gpu-check; with $OUT set, the table, the
#                               # bench JSON and logs.tar.gz of all logs are copied there
#
# Stages, in order; each one's failure is recorded and the script goes on to the table:
#   env       source .device/env.sh (node), nvidia-smi -L
#   build     CUDA addon (unless a carried one loads with CUDA usable) and the parity harness
#             (unless carried), in parallel, CUDAARCHS=90
#   parity    test/native cuda_parity --bench (CUDA vs CPU backend, every Backend method)
#   wide      cuda_parity --wide: one step of a 2^31 + 1000 element tensor (64-bit indexing)
#   golden    node dist/lib/cli.js replay FILE --backend cuda, every test/golden/*.json
#   fuzz      test/workers/fuzz-driver.mjs --backend cuda: 10,000 fuzzed calls on the GPU
#   oom       test/workers/oom-driver.mjs: out of GPU memory is catchable, leaks nothing
#   torch     bench/torch_baselines.py (D2D copy, fused Adam, eager PyTorch AdaFisher, which
#             first replays test/golden/ on the GPU to show it computes AdaFisher)
#   bench     node dist/bench/gpu.js --torch torch.json (the figures come before the
#             sanitizers, which are the stages most likely to run long)
#   memcheck  compute-sanitizer --tool memcheck over the parity harness (--sanitize: not the
#             deliberate failed cudaMalloc, which the sanitizer reports as an API error)
#   racecheck compute-sanitizer --tool racecheck over its short run (--sanitize --small)
#   profile   ncu over cuda_parity --profile: GPU time, DRAM bytes, achieved occupancy and
#             registers of every kernel of the cnn512 case's conv factor calls (against the
#             bench's wall time per call); the parity stage's "tune" lines sweep the plan
#             constants of the same calls (NOTE: [plan tuning] in cuda/launch_plan.h)
#   vitest    ADAFISHER_BACKEND=cuda vitest run: the test suite on the GPU, with whatever time
#             is left (not the tests that need npm, cmake or the CUDA host emulator)
#   package   the carried npm tarball, unpacked as an installed package: `adafisher info`
#   table     bench/gpu_summary.py: ONE short table, printed last
# Exit status: 0 when every stage run passed, 1 otherwise (the table says which did not).
#
# Prepare here (nvcc 13 is on this machine too) and carry, 64 MiB in all:
#   npx tsc -p tsconfig.json                                   -> dist
#   CUDAARCHS=90 npx cmake-js compile --out build-cuda         -> build-cuda/Release
#   cmake -S test/native -B build-native-test -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build-native-test -j2
#   bash ../shared/device/pack-node.sh                         -> .device
#   build-gpu-carry/: the parity harness (cuda_parity), the npm tarball, the node_modules the stages need (node-gyp-build,
#   node-api-headers, node-addon-api, fast-check, pure-rand), copied into node_modules here,
#   and test-modules.tar.xz (what the test suite loads from node_modules: vitest's closure
#   and TF.js's Node bundles, scripts/test-modules.mjs), unpacked into node_modules here
#   carry: .device dist build-cuda/Release build-gpu-carry
# (scripts/prepare-gpu-run.sh does all of it and checks the 64 MiB; about 45 MB).
#
# Knobs (environment): GPU_CHECK_BUDGET_S (default 470: stages that would not fit are
# skipped so the table always prints), GPU_CHECK_STAGES (comma list to run a subset, e.g.
# "parity,golden,bench" for a rerun), CUDAARCHS (default 90), ADAFISHER_ADDON (an addon
# to use instead of looking for one), GPU_CHECK_HARNESS (a parity harness to use instead).
# A dry run of the plumbing without a GPU: ADAFISHER_ADDON set to the CUDA host emulator's
# build (test/cuda-emulator) and GPU_CHECK_STAGES=golden,fuzz,oom,package; GPU_CHECK_HARNESS
# set to an emulator build of test/native adds parity, memcheck, racecheck and profile (with
# stand-in compute-sanitizer and ncu scripts on PATH; --bench takes ~8 min there unless
# SecondsPerCall's repetitions are cut for the dry run).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
# Logs go to out/gpu-check. The device tool's $OUT returns at most 8 files, so at the end
# it gets the table, the benchmark JSON and one tarball of every log.
RESULT=${OUT:-}
OUT=$ROOT/out/gpu-check
rm -rf "$OUT"
mkdir -p "$OUT"
# The stage log and statuses so far, rewritten as ONE file after every stage (the device
# tool returns at most 8 files from $OUT): if its timeout cuts the run short, this comes back.
PROGRESS=${RESULT:-$OUT}/progress.txt
mkdir -p "$(dirname "$PROGRESS")"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
STAGES=${GPU_CHECK_STAGES:-env,build,parity,wide,golden,fuzz,oom,torch,bench,memcheck,racecheck,profile,vitest,package}
export CUDAARCHS=${CUDAARCHS:-90}
RESERVE=20 # seconds kept for the table

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu-check +$(elapsed)s] $*" | tee -a "$OUT/gpu-check.log"; }
wanted() { [[ ",$STAGES," == *",$1,"* ]]; }
status() { echo "$2" > "$OUT/$1.status"; } # PASS / FAIL ... / SKIPPED ... / TIMEOUT
# The stage log and statuses so far into $PROGRESS (the one file a cut-short run returns).
progress() { { cat "$OUT/gpu-check.log"; for f in "$OUT"/*.status; do echo "$(basename "$f" .status): $(cat "$f")"; done; } > "$PROGRESS" 2> /dev/null; }
# What is left of the budget for a step that must end within it (at most $1 seconds, at least 10).
budget_limit() { local left=$((BUDGET - RESERVE - $(elapsed))); ((left > $1)) && left=$1; ((left < 10)) && left=10; echo "$left"; }

# run_stage NAME LIMIT_S CMD...: runs CMD under timeout with its output in $OUT/NAME.log;
# the limit shrinks to what is left of the budget. Returns CMD's exit code (124 = timeout).
run_stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - RESERVE - $(elapsed)))
  if ((left < 10)); then
    log "stage $name SKIPPED: out of time budget"
    status "$name" "SKIPPED (time budget)"
    progress
    return 125
  fi
  ((limit > left)) && limit=$left
  log "stage $name (limit ${limit}s): $*"
  local t0
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$rc" > "$OUT/$name.rc"
  log "stage $name rc=$rc in $(($(date +%s) - t0))s"
  if ((rc == 124 || rc == 137)); then status "$name" "TIMEOUT (${limit}s)"; elif ((rc == 0)); then status "$name" PASS; else status "$name" "FAIL (rc $rc)"; fi
  # On the GPU machine the harness must run its GPU cases: one that printed SKIP (no usable
  # device) checked nothing there.
  if ((rc == 0)) && grep -q '^SKIP:' "$OUT/$name.log"; then status "$name" "FAIL (GPU cases skipped)"; fi
  progress
  return $rc
}

# ---- env ---------------------------------------------------------------------------------
[ -d /usr/local/cuda/bin ] && export PATH=/usr/local/cuda/bin:$PATH
if [ -d build-gpu-carry/node_modules ]; then
  mkdir -p node_modules && cp -rn build-gpu-carry/node_modules/. node_modules/
fi
if [ -f build-gpu-carry/test-modules.tar.xz ] && wanted vitest; then
  if command -v xz > /dev/null 2>&1; then
    tar -xJf build-gpu-carry/test-modules.tar.xz
  else
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall('.')" build-gpu-carry/test-modules.tar.xz
  fi || echo "cannot unpack build-gpu-carry/test-modules.tar.xz" >> "$OUT/env.log"
fi
if [ -f .device/env.sh ]; then
  # shellcheck disable=SC1091
  source .device/env.sh >> "$OUT/env.log" 2>&1 || true
fi
{
  echo "node: $(command -v node || echo MISSING) $(node --version 2>/dev/null)"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  echo "python3: $(python3 --version 2>&1)"
  echo "compute-sanitizer: $(command -v compute-sanitizer || echo MISSING)"
} >> "$OUT/env.log"
nvidia-smi -L 2>&1 | tee "$OUT/nvidia-smi.txt"
nvidia-smi -L > /dev/null 2>&1 && status env PASS || status env "FAIL (nvidia-smi)"
log "env: $(head -1 "$OUT/nvidia-smi.txt")"
progress
HAVE_NODE=0
command -v node > /dev/null 2>&1 && HAVE_NODE=1
[ -f dist/lib/cli.js ] || log "dist/ is missing: carry it (npx tsc -p tsconfig.json here first)"
# The carried dist/ was compiled from this very tree, but the copy need not keep file times:
# make it newer than the sources, or the tests' staleness check would call tsc (not carried).
[ -d dist ] && find dist -type f -exec touch {} +

# ---- build -------------------------------------------------------------------------------
# An addon is good when it loads and reports a usable CUDA device.
addon_ok() {
  ((HAVE_NODE)) || return 1
  ADAFISHER_ADDON=$1 timeout -k 5 60 node -e "
    import('./dist/lib/index.js').then((m) => { const r = m.backendInfo('cuda');
      console.log(process.env.ADAFISHER_ADDON, JSON.stringify(r.cuda), r.reason);
      process.exit(r.cuda.usable ? 0 : 1); }, (e) => { console.log(e.message); process.exit(1); });" >> "$OUT/build.log" 2>&1
}
HARNESS=""
GEN=()
command -v ninja > /dev/null 2>&1 && GEN=(-G Ninja)
# The builds are bounded (5 minutes each step, and never past the budget): a hung build must
# not eat the device time, nor outlast the device command's timeout with nothing written.
build_addon() {
  # cmake directly, with the arguments cmake-js passes (only node-api-headers and
  # node-addon-api are needed from node_modules), so npx/npm need not be carried.
  timeout -k 10 "$(budget_limit 300)" cmake -S "$ROOT" -B "$ROOT/build-gpu" ${GEN[@]+"${GEN[@]}"} --no-warn-unused-cli -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/build-gpu/Release" \
    "-DCMAKE_JS_INC=$ROOT/node_modules/node-api-headers/include;$ROOT/node_modules/node-addon-api" \
    -DCMAKE_JS_SRC= -DCMAKE_JS_LIB= -DCMAKE_CXX_FLAGS=-DBUILDING_NODE_EXTENSION &&
    timeout -k 10 "$(budget_limit 300)" cmake --build "$ROOT/build-gpu" -j"$(nproc)"
}
build_harness() {
  timeout -k 10 "$(budget_limit 300)" cmake -S "$ROOT/test/native" -B "$ROOT/build-native-test-dev" ${GEN[@]+"${GEN[@]}"} -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="$CUDAARCHS" && timeout -k 10 "$(budget_limit 300)" cmake --build "$ROOT/build-native-test-dev" -j"$(nproc)"
}
# Look for a carried (or earlier-built) addon whose CUDA backend is usable, first of all.
: > "$OUT/build.log"
ADDON=""
for a in ${ADAFISHER_ADDON:-} build-cuda/Release/adafisher.node build-gpu/Release/adafisher.node build/Release/adafisher.node; do
  [ -f "$a" ] || continue
  if addon_ok "$(realpath "$a")"; then ADDON=$(realpath "$a"); break; fi
done
if wanted build; then
  log "stage build"
  pids=()
  if [ -z "$ADDON" ]; then
    log "no carried addon with usable CUDA; building build-gpu (CUDAARCHS=$CUDAARCHS)"
    (build_addon > "$OUT/build-addon.log" 2>&1) &
    pids+=($!)
  fi
  if [ -n "${GPU_CHECK_HARNESS:-}" ]; then
    HARNESS=$GPU_CHECK_HARNESS
  elif [ -x build-gpu-carry/cuda_parity ]; then
    HARNESS=$ROOT/build-gpu-carry/cuda_parity
  elif [ -x build-native-test/cuda_parity ]; then
    HARNESS=$ROOT/build-native-test/cuda_parity
  else
    log "no carried parity harness; building build-native-test-dev"
    (build_harness > "$OUT/build-harness.log" 2>&1) &
    pids+=($!)
    HARNESS=$ROOT/build-native-test-dev/cuda_parity
  fi
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p"; done
  if [ -z "$ADDON" ] && [ -f build-gpu/Release/adafisher.node ] && addon_ok "$ROOT/build-gpu/Release/adafisher.node"; then
    ADDON=$ROOT/build-gpu/Release/adafisher.node
  fi
  msg=""
  [ -n "$ADDON" ] || msg+=" addon (see build-addon.log)"
  [ -x "$HARNESS" ] || msg+=" harness (see build-harness.log)"
  if [ -z "$msg" ]; then status build PASS; else status build "FAIL:$msg"; fi
  [ -n "$ADDON" ] && export ADAFISHER_ADDON=$ADDON
  log "addon: ${ADDON:-none}; harness: $HARNESS"
  progress
else
  [ -n "$ADDON" ] && export ADAFISHER_ADDON=$ADDON
  HARNESS=${GPU_CHECK_HARNESS:-$ROOT/build-gpu-carry/cuda_parity}
  [ -x "$HARNESS" ] || HARNESS=$ROOT/build-native-test/cuda_parity
  [ -x "$HARNESS" ] || HARNESS=$ROOT/build-native-test-dev/cuda_parity
fi
export ADAFISHER_BACKEND=cuda

# ---- (1) parity --------------------------------------------------------------------------
if wanted parity; then
  if [ -x "$HARNESS" ]; then
    run_stage parity 120 "$HARNESS" --bench
    rc=$?
    if ((rc == 126 || rc == 127)) && [ "$HARNESS" != "$ROOT/build-native-test-dev/cuda_parity" ]; then
      log "carried harness does not run here (rc $rc); building build-native-test-dev"
      build_harness > "$OUT/build-harness.log" 2>&1 && HARNESS=$ROOT/build-native-test-dev/cuda_parity &&
        run_stage parity 120 "$HARNESS" --bench
    fi
  else
    status parity "SKIPPED (no harness)"
  fi
fi

# ---- 64-bit indexing: a 2^31 + 1000 element tensor stepped on the GPU (~26 GB) -----------
if wanted wide; then
  if [ -x "$HARNESS" ]; then run_stage wide 90 "$HARNESS" --wide; else status wide "SKIPPED (no harness)"; fi
fi

# ---- (2) golden replays ---------------------------------------------------------------------
if wanted golden; then
  if ((HAVE_NODE)) && [ -n "${ADAFISHER_ADDON:-}" ]; then
    : > "$OUT/golden.log"
    fails=0
    for f in test/golden/*.json; do
      n=$(basename "$f" .json)
      run_stage "golden-$n" 60 node dist/lib/cli.js replay "$f" --backend cuda
      rc=$?
      cp "$OUT/golden-$n.log" "$OUT/golden-$n.json" 2>/dev/null
      cat "$OUT/golden-$n.log" >> "$OUT/golden.log"
      ((rc == 0)) || fails=$((fails + 1))
    done
    if ((fails == 0)); then status golden PASS; else status golden "FAIL ($fails files)"; fi
  else
    status golden "SKIPPED (no node or no CUDA addon)"
  fi
fi

# ---- reliability on the GPU: fuzzing, out of memory ----------------------------------------
if wanted fuzz; then
  if ((HAVE_NODE)) && [ -n "${ADAFISHER_ADDON:-}" ] && [ -d node_modules/fast-check ]; then
    run_stage fuzz 90 node --expose-gc test/workers/fuzz-driver.mjs --calls 10000 --seed 20261128 --backend cuda \
      --log "$OUT/fuzz-calls.log"
  else
    status fuzz "SKIPPED (no node, CUDA addon or fast-check)"
  fi
fi
if wanted oom; then
  if ((HAVE_NODE)) && [ -n "${ADAFISHER_ADDON:-}" ]; then
    run_stage oom 90 node test/workers/oom-driver.mjs
  else
    status oom "SKIPPED (no node or no CUDA addon)"
  fi
fi

# ---- (4) benchmark -------------------------------------------------------------------------
if wanted torch || wanted bench; then
  if ((HAVE_NODE)); then timeout -k 5 60 node dist/bench/gpu.js --dump-cases > "$OUT/cases.json" 2> "$OUT/cases.err" || log "dump-cases failed"; fi
fi
if wanted torch; then
  if [ -s "$OUT/cases.json" ]; then
    run_stage torch 110 python3 bench/torch_baselines.py --cases "$OUT/cases.json" --out "$OUT/torch.json" \
      --check-golden test/golden/*.json
  else
    status torch "SKIPPED (no cases.json)"
  fi
fi
if wanted bench; then
  if ((HAVE_NODE)) && [ -n "${ADAFISHER_ADDON:-}" ]; then
    targs=()
    [ -s "$OUT/torch.json" ] && targs=(--torch "$OUT/torch.json")
    run_stage bench 150 node dist/bench/gpu.js "${targs[@]}" --json-out "$OUT/gpu-bench.json"
  else
    status bench "SKIPPED (no node or no CUDA addon)"
  fi
fi

# ---- (3) compute-sanitizer -------------------------------------------------------------------
if command -v compute-sanitizer > /dev/null 2>&1 && [ -x "$HARNESS" ]; then
  wanted memcheck && run_stage memcheck 100 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 3 --print-limit 20 "$HARNESS" --sanitize
  wanted racecheck && run_stage racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 "$HARNESS" --sanitize --small
else
  for s in memcheck racecheck; do wanted $s && status $s "SKIPPED (no compute-sanitizer or no harness)"; done
fi

# ---- where cnn512's conv factor time goes: every kernel of its six calls, timed by ncu -------
if wanted profile; then
  if ! command -v ncu > /dev/null 2>&1; then
    for d in /opt/nvidia/nsight-compute/*/ /usr/local/cuda/nsight-compute*/; do [ -x "${d}ncu" ] && export PATH=$PATH:${d%/}; done
  fi
  if command -v ncu > /dev/null 2>&1 && [ -x "$HARNESS" ]; then
    run_stage profile 90 ncu --clock-control none --csv --print-kernel-base function -k "regex:Conv|Reduce|Finalize" \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread \
      "$HARNESS" --profile
    # ncu exits 0 when it profiled nothing (no counter permission, no matching kernel).
    [ "$(cat "$OUT/profile.status")" = PASS ] && ! grep -q '^"' "$OUT/profile.log" && status profile "FAIL (ncu printed no rows)"
  else
    status profile "SKIPPED (no ncu or no harness)"
  fi
fi

# ---- the test suite on the GPU, last: it gets the time that is left --------------------------
# Left out: package (needs npm), cuda-harness (cmake + nvcc builds), cuda-emulator (its own
# build), readme and bench-cli (TypeScript checks and compiles; typescript is not carried).
if wanted vitest; then
  if ((HAVE_NODE)) && [ -f node_modules/vitest/vitest.mjs ] && [ -d node_modules/vite ] && [ -n "${ADAFISHER_ADDON:-}" ]; then
    run_stage vitest 180 node node_modules/vitest/vitest.mjs run --exclude test/package.test.ts \
      --exclude test/cuda-harness.test.ts --exclude test/cuda-emulator.test.ts \
      --exclude test/readme.test.ts --exclude test/bench-cli.test.ts
  else
    status vitest "SKIPPED (vitest not carried: build-gpu-carry/test-modules.tar.xz)"
  fi
fi

# ---- (5) the packed tarball picks CUDA by itself ----------------------------------------------
# Carry the `npm pack` tarball (adafisher-*.tgz; `npm pack` here after `npm run
# prebuild:binary`) and node_modules/node-gyp-build: it is unpacked as an installed package
# (no npm on this machine; nothing is compiled) and `adafisher info` runs with no backend
# forced, so the prebuilt binary's own choice shows.
TARBALL=$(ls build-gpu-carry/adafisher-*.tgz adafisher-*.tgz 2> /dev/null | head -1)
if wanted package && ((HAVE_NODE)) && [ -n "$TARBALL" ] && [ -d node_modules/node-gyp-build ]; then
  PKG=$(mktemp -d)/app
  mkdir -p "$PKG/node_modules/adafisher"
  tar -xzf "$TARBALL" -C "$PKG/node_modules/adafisher" --strip-components=1 &&
    cp -r node_modules/node-gyp-build "$PKG/node_modules/"
  (cd "$PKG" && env -u ADAFISHER_ADDON -u ADAFISHER_BACKEND node node_modules/adafisher/dist/lib/cli.js info) > "$OUT/package-info.txt" 2>&1
  if grep -q '^backend: *cuda' "$OUT/package-info.txt"; then status package PASS; else status package "FAIL (see package-info.txt)"; fi
elif wanted package; then
  status package "SKIPPED (no adafisher-*.tgz or node-gyp-build carried)"
fi

# ---- table ---------------------------------------------------------------------------------
log "done in $(elapsed)s; logs in $OUT"
python3 bench/gpu_summary.py "$OUT" > "$OUT/summary.txt" 2>&1 ||
  { echo "(bench/gpu_summary.py failed; the stage statuses:)"; for f in "$OUT"/*.status; do echo "$(basename "$f" .status): $(cat "$f")"; done; } >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
[ -f "$OUT/profile-kernels.txt" ] && { echo; cat "$OUT/profile-kernels.txt"; }
[ -f "$OUT/package-info.txt" ] && { echo; echo "packed tarball, adafisher info ($(cat "$OUT/package.status" 2>/dev/null)):"; cat "$OUT/package-info.txt"; }
if [ -n "$RESULT" ] && [ "$RESULT" != "$OUT" ]; then
  mkdir -p "$RESULT"
  for f in summary.txt gpu-bench.json torch.json package-info.txt profile-kernels.txt; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$RESULT/"; done
  tar -czf "$RESULT/logs.tar.gz" -C "$OUT" .
fi
# Exit 1 when any stage did not pass (the table says which), 0 when all did.
! grep -qvx PASS "$OUT"/*.status 2> /dev/null
