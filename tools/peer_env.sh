#!/usr/bin/env bash
# Build the llama.cpp peer once into a cached venv (~10 min on 2 cores): llama-cpp-python
# compiled from its PyPI sdist, which also carries llama.cpp's full source (converter,
# ggml-quants.c, tokenizer test vectors). `peer` tests, tools/make_golden.py and the
# benchmarks find it at $CPUQ_PEER_VENV (default ~/.cache/cpuq-peer/venv).
set -euo pipefail
PEER=${CPUQ_PEER_HOME:-$HOME/.cache/cpuq-peer}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$PEER"
cd "$PEER"
[ -x venv/bin/python ] || python3 -m venv venv
# HF transformers (CPU torch from the wheel on disk) for logits references and for running
# llama.cpp's own convert_hf_to_gguf.py (which imports sentencepiece even for BPE models).
if ! "$PEER/hf-venv/bin/python" -c "import torch, transformers, sentencepiece" 2>/dev/null; then
  python3 -m venv "$PEER/hf-venv"
  "$PEER/hf-venv/bin/pip" install -q torch==2.13.0
  "$PEER/hf-venv/bin/pip" install -q transformers safetensors sentencepiece numpy
fi
# llama.cpp's own command-line tools, linked against the peer's libraries (seconds to a
# minute each), as name:sources under the vendored tools/ folder. The references for
# cpuq perplexity (tests/eval/test_perplexity_peer.py), cpuq imatrix and convert --imatrix
# (tests/convert/test_imatrix_peer.py, tools/make_imatrix_golden.py).
PEER_TOOLS=(
  "llama-perplexity:perplexity/perplexity.cpp perplexity/main.cpp"
  "llama-imatrix:imatrix/imatrix.cpp"
  "llama-quantize:quantize/quantize.cpp quantize/main.cpp"
)
build_tools() {
  local src="$PEER/llama_cpp_python-$VERSION/vendor/llama.cpp" lib="$PEER/venv/lib/python3.11/site-packages/lib"
  local entry name sources f
  for entry in "${PEER_TOOLS[@]}"; do
    name=${entry%%:*}
    [ -x "$PEER/$name" ] && continue  # built already
    sources=()
    for f in ${entry#*:}; do sources+=("$src/tools/$f"); done
    # Built under a temporary name and renamed, so an interrupted build leaves no tool that looks built.
    g++ -O2 -std=c++17 -I"$src/include" -I"$src/common" -I"$src/ggml/include" -I"$src/vendor" \
      "${sources[@]}" -o "$PEER/$name.partial" \
      -L"$lib" -lllama-common -lllama -lggml -lggml-base -Wl,-rpath,"$lib"
    mv "$PEER/$name.partial" "$PEER/$name"
  done
}
if venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  build_tools
  echo "peer venvs ready: $PEER/venv, $PEER/hf-venv; tools: $PEER/llama-{perplexity,imatrix,quantize}"; exit 0
fi
venv/bin/pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d sdist
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "sdist/llama_cpp_python-$VERSION.tar.gz"
# Native CPU flags for the runtime (fair speed comparisons); the reference quantizers
# live in ggml-base, which CMake builds without -march, so its rounding is portable.
# AMX off: on hosts with AMX (Sapphire Rapids and later) a native build's AMX matrix products
# crash on Q4_K files (llama.cpp issue 20824, ggml_backend_amx_mul_mat); the AVX512/VNNI
# kernels and weight repacking stay as a native build has them.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'" \
  venv/bin/pip install -v "sdist/llama_cpp_python-$VERSION.tar.gz" > build.log 2>&1
echo "peer venv ready: $PEER/venv (llama.cpp source: $PEER/llama_cpp_python-$VERSION/vendor/llama.cpp)"
build_tools
