#!/usr/bin/env bash
# Build llama.cpp's CPU tools (llama-bench, llama-quantize) from the llama-cpp-python sdist on PyPI,
# for the decode benchmark (benchmarks/bench_decode.py --llama-cpp). llama.cpp is not a dependency of rabit.
#
#   bash benchmarks/build_llama_cpp.sh            # -> third_party/llama.cpp/{src,build/bin}
#   JOBS=2 LLAMA_CPP_PYTHON_VERSION=0.3.36 bash benchmarks/build_llama_cpp.sh
#
# third_party/ is git-ignored. The build takes ~6 minutes with 2 cores; a finished build is reused.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${LLAMA_CPP_DIR:-$ROOT/third_party/llama.cpp}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

if [ -x "$DEST/build/bin/llama-bench" ] && [ -x "$DEST/build/bin/llama-quantize" ]; then
  echo "llama.cpp already built in $DEST/build/bin"
  exit 0
fi

mkdir -p "$DEST"
if [ ! -f "$DEST/src/CMakeLists.txt" ]; then
  dl="$DEST/download"
  mkdir -p "$dl"
  if ! ls "$dl"/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$dl" \
      "llama-cpp-python==$VERSION" || \
    "$PY" -m pip download --no-deps --no-binary :all: -d "$dl" "llama-cpp-python==$VERSION"
  fi
  tarball="$(ls "$dl"/llama_cpp_python-*.tar.gz | head -1)"
  tmp="$DEST/extract"
  rm -rf "$tmp" && mkdir -p "$tmp"
  tar -xzf "$tarball" -C "$tmp"
  rm -rf "$DEST/src"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$DEST/src"
  rm -rf "$tmp"
fi

cmake -S "$DEST/src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=ON
cmake --build "$DEST/build" -j "$JOBS" --target llama-bench llama-quantize
ls -la "$DEST/build/bin"
echo "built llama.cpp tools in $DEST/build/bin"
