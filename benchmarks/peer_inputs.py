"""Where the llama.cpp peer lives, and the benchmark inputs made with it, built once and cached.

Shared by the side-by-side benchmarks (convert_vs_llama.py, runtime_vs_llama.py); not a
script. The peer is tools/peer_env.sh's: llama-cpp-python in $CPUQ_PEER_VENV (default
~/.cache/cpuq-peer/venv), the torch+transformers venv $CPUQ_HF_VENV (default
~/.cache/cpuq-peer/hf-venv) and the vendored llama.cpp source (convert_hf_to_gguf.py).

Inputs, under $CPUQ_BENCH_HOME (default ~/.cache/cpuq-bench):
  <shape>-shape/                 an HF checkpoint with a real model's exact shapes (SHAPES), random
                                 N(0, 0.02) bf16 weights, the real Qwen2 tokenizer; built by
                                 tools/make_tiny_checkpoint.py in a subprocess
  gguf/<shape>-llama-f16.gguf    llama.cpp's `convert_hf_to_gguf.py --outtype f16` of it
  gguf/<shape>-llama-<type>.gguf llama-quantize of that F16 file (llama_model_quantize, its default mix)
  gguf/<shape>-cpuq-<type>.gguf  `cpuq convert --type <type>` of the checkpoint
Everything is written under a temporary name and renamed when complete, so an interrupted
build is never reused; a GGUF file older than its checkpoint is rebuilt.

Imports only the standard library: the benchmarks' parent processes stay small (a child's
ru_maxrss starts from the RSS of the process that spawned it), and the llama.cpp peer's
Python imports the benchmark scripts too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER = Path(os.environ.get("CPUQ_PEER_HOME", Path.home() / ".cache" / "cpuq-peer"))
LLAMA_CPP = PEER / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
CONVERT_HF = LLAMA_CPP / "convert_hf_to_gguf.py"
HF_PYTHON = Path(os.environ.get("CPUQ_HF_VENV", PEER / "hf-venv")) / "bin" / "python"
PEER_PYTHON = Path(os.environ.get("CPUQ_PEER_VENV", PEER / "venv")) / "bin" / "python"
BENCH_HOME = Path(os.environ.get("CPUQ_BENCH_HOME", Path.home() / ".cache" / "cpuq-bench"))
CHECKPOINT_SEED = 0
_STAMP = ".cpuq-bench-complete"


@dataclass(frozen=True)
class Shape:
    """A real model's shapes: the config.json keys that differ from make_tiny_checkpoint's
    CONFIGS[arch] (which already carry the family's vocabulary of 151936, rope_theta 1e6,
    rms_norm_eps 1e-6, biases or q/k norms, and tied embeddings by default)."""
    arch: str
    config: dict[str, Any] = field(hash=False)
    about: str


SHAPES: dict[str, Shape] = {
    # Qwen/Qwen2.5-0.5B config.json
    "qwen2.5-0.5b": Shape("qwen2", {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                                    "num_attention_heads": 14, "num_key_value_heads": 2, "max_window_layers": 24},
                          "Qwen2ForCausalLM, 494M parameters, hidden 896, 24 layers, 14/2 heads, q/k/v biases, tied"),
    # Qwen/Qwen3-0.6B config.json (head_dim 128 is not hidden / heads = 64; max_position_embeddings
    # 40960 and attention_bias false are make_tiny_checkpoint's qwen3 defaults)
    "qwen3-0.6b": Shape("qwen3", {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                                  "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                                  "max_window_layers": 28},
                        "Qwen3ForCausalLM, 596M parameters, hidden 1024, 28 layers, 16/8 heads of 128, q/k norm, tied"),
}

# --types name -> llama-quantize's ftype (llama_cpp constant); the default mix, not --pure.
LLAMA_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}

# llama-quantize through llama-cpp-python, as tests/convert/test_convert_peer.py calls it.
QUANTIZE_PY = """\
import sys, llama_cpp
src, dst, ftype, nthread = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, ftype)
p.nthread = nthread
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p))
"""


def check_peer(*paths: Path) -> None:
    """Exit with a hint if a part of the peer is missing."""
    hints = {HF_PYTHON: "torch venv", PEER_PYTHON: "llama-cpp-python venv", CONVERT_HF: "llama.cpp source"}
    for path in paths:
        if not path.exists():
            raise SystemExit(f"{path} missing ({hints.get(path, 'peer')}: run tools/peer_env.sh)")


def probe(python: Path, code: str) -> str:
    """What `python -c code` prints, or '?' with the error's last line."""
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else f"? ({r.stderr.strip().splitlines()[-1:]})"


# commands -----------------------------------------------------------------------

def convert_hf_cmd(src: Path, f16: Path) -> tuple[list[str], dict[str, str]]:
    """llama.cpp's converter to F16: (argv, environment additions)."""
    return ([str(HF_PYTHON), str(CONVERT_HF), str(src), "--outtype", "f16", "--outfile", str(f16)],
            {"PYTHONPATH": str(LLAMA_CPP / "gguf-py")})


def quantize_cmd(f16: Path, dst: Path, qtype: str, threads: int) -> tuple[list[str], dict[str, str]]:
    """llama-quantize F16 -> `qtype` (a LLAMA_FTYPES key): (argv, environment additions)."""
    return [str(PEER_PYTHON), "-c", QUANTIZE_PY, str(f16), str(dst), LLAMA_FTYPES[qtype], str(threads)], {}


def cpuq_convert_cmd(src: Path, dst: Path, qtype: str, threads: int,
                     cpuq: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """`cpuq convert` (the CLI next to the running Python unless `cpuq` is given)."""
    cli = cpuq or Path(sys.executable).parent / "cpuq"
    return ([str(cli), "convert", str(src), "-o", str(dst), "--type", qtype, "--force"],
            {"NUMBA_NUM_THREADS": str(threads)})


# cached inputs ------------------------------------------------------------------

def checkpoint_dir(shape: str) -> Path:
    return BENCH_HOME / f"{shape}-shape"


def ensure_checkpoint(shape: str, out_dir: Path | None = None, build: bool = True) -> Path:
    """The checkpoint with SHAPES[shape]'s shapes, built once in a subprocess (0.5-0.6B
    parameters: ~15 s and ~4 GiB of RAM, 1 GiB on disk)."""
    s = SHAPES[shape]
    out_dir = out_dir or checkpoint_dir(shape)
    stamp_text = json.dumps({"arch": s.arch, "dtype": "bf16", "seed": CHECKPOINT_SEED, **s.config}, sort_keys=True)
    stamp = out_dir / _STAMP
    if stamp.exists() and stamp.read_text() == stamp_text:
        return out_dir
    if not build:
        raise SystemExit(f"{out_dir}: no complete {shape} checkpoint (run without --skip-build)")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "tools" / "make_tiny_checkpoint.py"), str(tmp), "--arch", s.arch,
           "--dtype", "bf16", "--seed", str(CHECKPOINT_SEED)]
    for key, value in s.config.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    print(f"building {out_dir} ({shape} shapes, random bf16) ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (tmp / _STAMP).write_text(stamp_text)
    tmp.rename(out_dir)
    return out_dir


def _run_logged(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "wb") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)[:200]} failed (exit {r.returncode}); end of {log}:\n{tail}")


def _fresh(path: Path, src: Path) -> bool:
    return path.exists() and path.stat().st_mtime >= (src / _STAMP).stat().st_mtime


def _build(dst: Path, cmd_for, what: str) -> Path:
    """Run the command `cmd_for(tmp_path)` to write `dst` under a temporary name, then rename."""
    tmp = dst.with_name(dst.stem + ".partial.gguf")
    tmp.unlink(missing_ok=True)
    cmd, env = cmd_for(tmp)
    print(f"writing {dst.name} ({what}) ...", file=sys.stderr, flush=True)
    _run_logged(cmd, env, dst.with_suffix(".log"))
    tmp.rename(dst)
    return dst


def _gguf_target(shape: str, kind: str, build: bool) -> tuple[Path, Path, bool]:
    """(checkpoint, the shape's `kind` GGUF file, whether it must be (re)built)."""
    src = ensure_checkpoint(shape, build=build)
    out = BENCH_HOME / "gguf" / f"{shape}-{kind}.gguf"
    if _fresh(out, src):
        return src, out, False
    if not build:
        raise SystemExit(f"{out} missing or older than its checkpoint (run without --skip-build)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return src, out, True


def ensure_llama_gguf(shape: str, qtype: str, threads: int = 2, build: bool = True) -> Path:
    """llama.cpp's `qtype` file ("f16" or a LLAMA_FTYPES key) of the shape's checkpoint."""
    src, out, stale = _gguf_target(shape, f"llama-{qtype}", build)
    if not stale:
        return out
    if qtype == "f16":
        check_peer(HF_PYTHON, CONVERT_HF)
        return _build(out, lambda tmp: convert_hf_cmd(src, tmp), "convert_hf_to_gguf.py --outtype f16")
    check_peer(PEER_PYTHON)
    f16 = ensure_llama_gguf(shape, "f16", threads, build)
    return _build(out, lambda tmp: quantize_cmd(f16, tmp, qtype, threads), f"llama-quantize {qtype}")


def ensure_cpuq_gguf(shape: str, qtype: str, threads: int = 2, build: bool = True) -> Path:
    """`cpuq convert`'s `qtype` file of the shape's checkpoint."""
    src, out, stale = _gguf_target(shape, f"cpuq-{qtype}", build)
    if not stale:
        return out
    return _build(out, lambda tmp: cpuq_convert_cmd(src, tmp, qtype, threads), f"cpuq convert --type {qtype}")
