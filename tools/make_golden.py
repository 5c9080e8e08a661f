"""Write tests/golden/quants.npz: llama.cpp's bytes for every block type cpuq encodes,
so CI checks bit-exactness without building llama.cpp.

Run with the peer library built (tools/peer_env.sh):  .venv/bin/python tools/make_golden.py
The inputs are stored next to the outputs (numpy's random streams are not promised to
stay the same across versions). Never edit the output by hand.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as G

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ggml_oracle  # noqa: E402
from tests import data  # noqa: E402
from toolcli import ToolError, output_file, run  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
ROWS, COLS = 8, 1536  # 1536 = 6 super-blocks of 256 = 48 blocks of 32; SmolLM2's ffn width
OUT = ROOT / "tests" / "golden" / "quants.npz"


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_golden.py takes none")
    if not ggml_oracle.available():
        raise ToolError(f"llama.cpp peer library not found under {ggml_oracle.PEER_VENV}; run tools/peer_env.sh")
    arrays: dict[str, np.ndarray] = {}
    imp = data.importance(COLS, seed=7)
    arrays["importance"] = imp
    for kind, make in data.KINDS.items():
        x = make(ROWS, COLS, seed=3)
        arrays[f"x/{kind}"] = x
        for name in TYPES:
            arrays[f"q/{kind}/{name}/plain"] = ggml_oracle.quantize(x, G[name])
            arrays[f"q/{kind}/{name}/imatrix"] = ggml_oracle.quantize(x, G[name], imp)
    with output_file(OUT) as tmp, open(tmp, "wb") as f:  # a file object: savez would add ".npz" to a name
        np.savez_compressed(f, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays) from {ggml_oracle.library_path()}")


if __name__ == "__main__":
    run(main, sys.argv[1:])
