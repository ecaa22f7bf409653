#!/usr/bin/env bash
# Builds llama.cpp's llama-server, CPU only, from the exact llama.cpp release that
# node-llama-cpp bundles (llama/gitRelease.bundle), so the peer in every benchmark is
# the same engine version as ours. It builds outside the repository, in the
# benchmark's scratch folder; nothing it produces is ever committed.
#
#   bash bench/build-llama-server.sh            # prints the path of the binary
#   SPINDLE_BENCH_DIR=/some/dir bash bench/build-llama-server.sh
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
scratch="${SPINDLE_BENCH_DIR:-${TMPDIR:-/tmp}/spindle-bench}"
bundle="$here/node_modules/node-llama-cpp/llama/gitRelease.bundle"
release="$(node -p "require('$here/node_modules/node-llama-cpp/llama/binariesGithubRelease.json').release")"
src="$scratch/llama.cpp-$release"
bin="$src/build/bin/llama-server"

if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
command -v cmake >/dev/null || { echo "cmake is needed (apt-get install cmake)" >&2; exit 1; }
mkdir -p "$scratch"
if [ ! -d "$src/.git" ]; then
  git clone --quiet "$bundle" "$src" >&2
fi
git -C "$src" checkout --quiet "$release" 2>/dev/null || true
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$src/build" --target llama-server -j "$(nproc)" >&2
echo "$bin"
