#!/usr/bin/env bash
# Prepares, on a machine without a GPU, everything scripts/gpu-check.sh needs on a lent GPU
# machine (which has CUDA, cmake and python3 but no Node.js, npm or network), then prints
# the `carry` list and the command to run there. From the repository root, after `npm ci`:
#   bash scripts/prepare-gpu-run.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CUDAARCHS=${CUDAARCHS:-90}
PACK_NODE=../shared/device/pack-node.sh
# Checked first: the last step needs it, after minutes of building.
[ -f "$PACK_NODE" ] || { echo "prepare-gpu-run: $PACK_NODE not found (run from the checkout beside ../shared)" >&2; exit 1; }

node node_modules/typescript/bin/tsc -p tsconfig.json
# The options are given, not left to the build folders' caches: a folder once configured for
# the CUDA host emulator (or ASan) keeps that setting, and would send an emulated addon or
# harness, which "passes" on the GPU machine without touching the GPU.
GPU_OPTS=(-DADAFISHER_CUDA=ON -DADAFISHER_CUDA_EMULATOR=OFF -DADAFISHER_SANITIZE=OFF)
# The addon for the GPU (one architecture keeps the build short) ...
node node_modules/cmake-js/bin/cmake-js compile --out build-cuda "${GPU_OPTS[@]/#-D/--CD}"
# ... the standalone parity harness (compute-sanitizer runs it) ...
cmake -S test/native -B build-native-test -DCMAKE_CUDA_ARCHITECTURES="$CUDAARCHS" "${GPU_OPTS[@]:1}" > /dev/null
cmake --build build-native-test -j"$(nproc)"
# ... the npm tarball with the full prebuilt binary (all architectures), to see which
# backend an installed package picks there ...
# (always through cmake-js: incremental, and never a stale binary from an older checkout).
env -u CUDAARCHS node node_modules/cmake-js/bin/cmake-js compile --out build "${GPU_OPTS[@]/#-D/--CD}"
ADAFISHER_PREBUILD_REUSE=build/Release/adafisher.node node scripts/prebuild.mjs
rm -rf build-gpu-carry adafisher-*.tgz
mkdir -p build-gpu-carry/node_modules
# The harness binary alone (3 MB; its build folder is 12 MB of objects).
cp build-native-test/cuda_parity build-gpu-carry/
npm pack --silent --pack-destination build-gpu-carry > /dev/null
# ... the few packages the stages load (one carry path for all of them) ...
for m in node-gyp-build node-api-headers node-addon-api fast-check pure-rand; do
  cp -r "node_modules/$m" build-gpu-carry/node_modules/
done
# ... the test suite's run-time modules for stage vitest (11 MB of xz; scripts/test-modules.mjs) ...
node scripts/test-modules.mjs > build-gpu-carry/test-modules.txt
tar -cf - -T build-gpu-carry/test-modules.txt | xz -6 -T0 > build-gpu-carry/test-modules.tar.xz
rm build-gpu-carry/test-modules.txt
# ... and Node.js itself.
bash "$PACK_NODE" > /dev/null

# What travels: the tracked and untracked-not-ignored files and the carried paths, 64 MiB at most.
CARRY=(.device dist build-cuda/Release build-gpu-carry)
tracked=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2> /dev/null | tail -1 | cut -f1)
carried=$(du -cb "${CARRY[@]}" | tail -1 | cut -f1)
total=$((tracked + carried))
printf 'travels: %d MiB (tracked %d MiB + carried %d MiB; the limit is 64 MiB)\n' $((total >> 20)) $((tracked >> 20)) $((carried >> 20))
if ((total > 64 << 20)); then
  echo "prepare-gpu-run: over 64 MiB: carry less" >&2
  exit 1
fi
# A full run took under a minute on an H200 (bench/results): the budget leaves room for a rerun
# within the session's 15 minutes of device time, machine start included.
cat <<'TXT'
Ready. Run on the GPU machine (device tool), with:
  carry:   [".device", "dist", "build-cuda/Release", "build-gpu-carry"]
  command: GPU_CHECK_BUDGET_S=300 bash scripts/gpu-check.sh
  timeout_s: 360
TXT
