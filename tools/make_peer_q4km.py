"""Have llama.cpp itself write a Q4_K_M (and Q8_0) GGUF of the demo model, for tests that
need "a file llama.cpp produced". Runs in the peer venv (tools/peer_env.sh):

    ~/.cache/cpuq-peer/venv/bin/python tools/make_peer_q4km.py SRC.gguf OUT_DIR

llama.cpp re-quantizes the demo model's Q4_1 weights (allow_requantize), so the files
carry llama.cpp's own Q4_K_M recipe and tensor layout.
"""
import sys
from pathlib import Path

import llama_cpp

FTYPES = {"Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def main(src: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, ftype in FTYPES.items():
        dst = out / f"smollm2-135m-llamacpp-{name.lower()}.gguf"
        if dst.exists():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(src.encode(), str(dst).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed ({rc}) for {dst}")
        print(dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
