#!/usr/bin/env bash
# Builds llama.cpp's TARGETS (default: llama-bench llama-quantize llama-server) from
# the source inside PyPI's llama-cpp-python package, with cmake and ninja from PyPI;
# nothing else is downloaded. Prints the folder of the binaries. Shared by
# benches/vs-llamacpp.sh and benches/serve-load.py.
#
#   benches/llamacpp-build.sh                         # into target/llamacpp
#   WORK=/tmp/llama LLAMA_CPP_PYTHON=0.3.36 benches/llamacpp-build.sh llama-server
#   WORK=target/llamacpp-noamx CFLAGS="-mno-amx-tile -mno-amx-int8" \
#       CXXFLAGS="-mno-amx-tile -mno-amx-int8" benches/llamacpp-build.sh llama-bench
#                                 # compiler flags (read by cmake's first configure of
#                                 # WORK), e.g. a build without its AMX kernels
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${LLAMA_CPP_PYTHON:-0.3.36}
work=${WORK:-target/llamacpp}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama-bench llama-quantize llama-server)
mkdir -p "$work"
bin="$work/build/bin"

missing=()
for t in "${targets[@]}"; do
    [ -x "$bin/$t" ] || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ ! -x "$work/venv/bin/cmake" ]; then
        python3 -m venv "$work/venv" >&2
        "$work/venv/bin/pip" install --quiet cmake ninja >&2
    fi
    if [ ! -d "$work/src" ]; then
        "$work/venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$VERSION" -d "$work/sdist" >&2
        mkdir -p "$work/src"
        tar -xzf "$work"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$work/src" --strip-components=1
    fi
    PATH="$PWD/$work/venv/bin:$PATH" cmake -S "$work/src/vendor/llama.cpp" -B "$work/build" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
    PATH="$PWD/$work/venv/bin:$PATH" ninja -C "$work/build" "${missing[@]}" >/dev/null
fi
echo "$bin"
