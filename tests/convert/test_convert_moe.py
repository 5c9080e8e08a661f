"""cpuq.convert on mixture-of-experts checkpoints is byte-identical to llama.cpp, checked
without llama.cpp: tests/golden/moe_convert.json (tools/make_moe_golden.py) holds the sha256
of llama.cpp's own f16 and q8_0 (convert_hf_to_gguf.py) and q4_k_m (llama-quantize Q4_K_M,
the mix) files of small bf16 checkpoints, which make_tiny_checkpoint rebuilds here from the
same arguments: qwen3moe with 8 experts at row length 256 (llama-quantize's 8-expert bumps,
Q4_K/Q6_K stacks) and fused qwen2moe with 6 (its shared expert, the stacks' fallbacks).
tests/convert/test_convert_moe_peer.py compares against llama.cpp live, on more cases.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import cpuq
from make_moe_golden import CONVERT_CASES, QTYPES, build_convert_case

GOLDEN = json.loads((Path(__file__).resolve().parent.parent / "golden" / "moe_convert.json").read_text())


def test_golden_is_of_these_checkpoints():
    """The golden was made from the checkpoints this file rebuilds (else regenerate it)."""
    assert {name: (c["arch"], c["checkpoint"]) for name, c in GOLDEN["cases"].items()} == \
        {name: (arch, kwargs) for name, (arch, kwargs) in CONVERT_CASES.items()}


@pytest.fixture(scope="module")
def checkpoint(module_tmp_factory):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_convert_case(name, module_tmp_factory.mktemp(name))
            assert built[name].name == GOLDEN["cases"][name]["folder"]  # general.name comes from it
        return built[name]
    return get


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("name", list(CONVERT_CASES))
def test_moe_same_bytes_as_llama_cpp(name, qtype, checkpoint, tmp_path):
    want = GOLDEN["cases"][name]["files"][qtype]
    path = cpuq.convert(checkpoint(name), tmp_path / "cpuq.gguf", qtype)
    assert path.stat().st_size == want["bytes"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want["sha256"], f"{name} {qtype}: not llama.cpp's bytes"
