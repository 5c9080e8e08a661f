"""Have llama.cpp itself write a Q4_K_M (and Q8_0) GGUF of the demo model, for tests that
need "a file llama.cpp produced". Runs in the peer venv (tools/peer_env.sh):

    ~/.cache/cpuq-peer/venv/bin/python tools/make_peer_q4km.py SRC.gguf OUT_DIR

llama.cpp re-quantizes the demo model's Q4_1 weights (allow_requantize), so the files
carry llama.cpp's own Q4_K_M recipe and tensor layout. A file already in OUT_DIR is kept;
each new one is written under a temporary name and renamed when complete.
"""
from pathlib import Path

import llama_cpp

from toolcli import ArgumentParser, ToolError, output_file, require_file, run

FTYPES = {"Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description="llama.cpp's own Q4_K_M and Q8_0 files of a GGUF model.")
    ap.add_argument("src", type=Path, help="the GGUF to re-quantize (the demo model)")
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    src = require_file(args.src, "source GGUF")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for name, ftype in FTYPES.items():
        dst = out / f"smollm2-135m-llamacpp-{name.lower()}.gguf"
        if dst.exists():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        params.nthread = 2
        with output_file(dst) as tmp:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
            if rc != 0:
                raise ToolError(f"{src}: llama_model_quantize failed ({rc}) writing {dst.name}")
        print(dst)


if __name__ == "__main__":
    run(main)
