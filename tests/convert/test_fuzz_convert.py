"""Property tests of the converter's inputs: a mutated config.json or model.safetensors
(tools/fuzz.py's mutators, on tiny qwen2 and llama checkpoints) either converts to a GGUF
that opens, or raises a CpuqError with a one-line message naming the checkpoint and leaves
the output folder empty. Anything else fails: another exception, a hang, a crash.
CI runs a few hundred cases; `pytest -m slow` runs 2,000 of each, and tools/fuzz.py the long
run in crash-proof worker processes. Below them, the inputs the long runs found, each once.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpuq
import fuzz  # tools/fuzz.py (conftest puts tools/ on the path)
from cpuq.convert import hf_vocab


@pytest.fixture(scope="module")
def targets(module_tmp_factory):
    # The tokenizer memo (fuzz.memoised) for this module only: it skips re-reading the same
    # unmutated tokenizer.json, 0.75 s a case.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_vocab, "read_tokenizer_files", fuzz.memoised(hf_vocab.read_tokenizer_files))
        work = module_tmp_factory.mktemp("fuzz-ckpt")
        yield {"config": fuzz.ConfigTarget(work), "safetensors": fuzz.SafetensorsTarget(work)}


@pytest.fixture(scope="module")
def scratch(module_tmp_factory):
    return module_tmp_factory.mktemp("fuzz-case")


def test_seed_checkpoints_convert(targets, scratch):
    target = targets["config"]  # the same checkpoints as the safetensors target's
    assert [s[0] for s in target.seeds] == [s[0] for s in targets["safetensors"].seeds] == ["llama", "qwen2",
                                                                                            "qwen2moe", "qwen35"]
    for k in range(len(target.seeds)):
        assert target.run(k, target.seeds[k][2], scratch) == "converted"
        assert not any((scratch / "out").iterdir())


def _case(target, scratch, rnd):
    k, data = target.make(rnd)
    assert target.run(k, data, scratch) in target.outcomes  # raises on anything but a clean CpuqError


SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck))


@settings(max_examples=120, **SETTINGS)
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_safetensors_convert_or_fail_cleanly(targets, scratch, rnd):
    _case(targets["safetensors"], scratch, rnd)


@settings(max_examples=40, **SETTINGS)
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_config_converts_or_fails_cleanly(targets, scratch, rnd):
    _case(targets["config"], scratch, rnd)


@pytest.mark.slow
@settings(max_examples=2000, **SETTINGS)
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_safetensors_convert_or_fail_cleanly_long(targets, scratch, rnd):
    _case(targets["safetensors"], scratch, rnd)


@pytest.mark.slow
@settings(max_examples=2000, **SETTINGS)
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_config_converts_or_fails_cleanly_long(targets, scratch, rnd):
    _case(targets["config"], scratch, rnd)


# what the long runs found -----------------------------------------------------------------

def _config(targets, **changes) -> bytes:
    seed = next(s for s in targets["config"].seeds if s[0] == "qwen2")
    return fuzz._dumps({**json.loads(seed[2]), **changes})


def _rejected(target, k, data, scratch, error, *words):
    """The case fails cleanly (target.convert checks the message and the empty output
    folder) with `error`, whose message holds `words`."""
    with pytest.raises(error) as e:
        target.convert(k, data, scratch)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("changes, words", [
    # float() of a list: TypeError
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": [1]}}, ["rope_theta", "[1]"]),
    # a layer count from text_config expanded into 2^31 tensor names: a hang
    ({"text_config": {"num_hidden_layers": 2**31}}, ["num_hidden_layers 2147483648", "tensors"]),
    # a vocabulary of 2^31 "[PAD]" tokens built before the embedding's rows were checked: a hang
    ({"vocab_size": 2**31}, ["model.embed_tokens.weight", "[2147483648, 64]"]),
    # written as a GGUF uint32: struct.error
    ({"max_position_embeddings": 2**63}, ["max_position_embeddings", "9223372036854775808", "4294967295"]),
    # np.isfinite of an int beyond float64: TypeError
    ({"rope_scaling": {"rope_type": "yarn", "factor": 10**400, "original_max_position_embeddings": 4096}},
     ["rope_scaling 'factor'", "expected a number"]),
    ({"rope_theta": 10**400}, ["rope_theta", "expected a positive number"]),
    # int() of a string: ValueError
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": "4k"}},
     ["original_max_position_embeddings", "'4k'"]),
    # the converter's own message, which named no file
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["config.json", "original_max_position_embeddings"]),
    # a 100 kB string quoted whole
    ({"hidden_size": "x" * 100_000}, ["hidden_size", "'xxxxxxxxxxxx...xxxxxxxxxxxxx'"]),
])
def test_config_found_by_fuzzing(targets, scratch, changes, words):
    k = [s[0] for s in targets["config"].seeds].index("qwen2")
    _rejected(targets["config"], k, _config(targets, **changes), scratch, cpuq.FormatError, *words)


@pytest.mark.parametrize("rope, words", [
    # seed 3's config run, cases 71972, 77864, 87125: ZeroDivisionError, ZeroDivisionError, TypeError
    ({"type": "llama3", "high_freq_factor": 0}, ["0 < low_freq_factor < high_freq_factor", "not 1.0 and 0"]),
    ({"type": "llama3", "high_freq_factor": 4.0, "original_max_position_embeddings": 4.0, "low_freq_factor": 0},
     ["0 < low_freq_factor < high_freq_factor", "not 0 and 4.0"]),
    ({"type": "llama3", "factor": None}, ["llama3 rope_scaling 'factor' is null"]),
    ({"rope_type": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 4.0}, ["not 4.0 and 4.0"]),
])
def test_llama3_rope_scaling_found_by_fuzzing(targets, scratch, rope, words):
    k = [s[0] for s in targets["config"].seeds].index("llama")
    data = fuzz._dumps({**json.loads(targets["config"].seeds[k][2]), "rope_scaling": rope})
    _rejected(targets["config"], k, data, scratch, cpuq.FormatError, "config.json", *words)


def test_deeply_nested_config_is_not_valid_json(targets, scratch):
    # json.loads raised RecursionError, which the reader did not catch
    _rejected(targets["config"], 0, b"[" * 100_000 + b"]" * 100_000, scratch, cpuq.FormatError,
              "config.json", "not valid JSON")


def _safetensors(targets, edit_header=None, edit_data=None, arch="qwen2") -> tuple[int, bytes]:
    k = [s[0] for s in targets["safetensors"].seeds].index(arch)
    raw = targets["safetensors"].seeds[k][2]
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])
    if edit_header:
        edit_header(header)
    if edit_data:
        edit_data(header, data)
    text = json.dumps(header).encode()
    return k, len(text).to_bytes(8, "little") + text + bytes(data)


def test_nan_weight_is_named_by_tensor(targets, scratch):
    # quantize's InputError named neither the file nor the tensor
    def nan_at_row_3(header, data):
        begin, _ = header["model.layers.0.mlp.up_proj.weight"]["data_offsets"]
        data[begin + 2 * (3 * 64 + 5):begin + 2 * (3 * 64 + 6)] = b"\xc0\x7f"  # BF16 NaN at row 3, column 5
    k, data = _safetensors(targets, edit_data=nan_at_row_3)
    _rejected(targets["safetensors"], k, data, scratch, cpuq.FormatError,
              "model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' holds nan at row 3, column 5")


def test_value_beyond_f16_is_named_for_llama_quantize_types(targets, tmp_path):
    # BF16 0x7E96 (~1e38) is finite, but llama-quantize reads the weights as F16, where it is
    # inf, which the block types refuse: quantize's InputError named no file
    def big(header, data):
        begin, _ = header["model.layers.0.mlp.up_proj.weight"]["data_offsets"]
        data[begin:begin + 2] = (0x7E96).to_bytes(2, "little")
    k, data = _safetensors(targets, edit_data=big)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for p in targets["safetensors"].seeds[k][1].iterdir():
        if p.name != "model.safetensors":
            (ckpt / p.name).symlink_to(p)
    (ckpt / "model.safetensors").write_bytes(data)
    with pytest.raises(cpuq.FormatError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                               r"holds 9\.\d+e\+37 at row 0, column 0: beyond F16's range"):
        cpuq.convert(ckpt, tmp_path / "x.gguf", "q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_shape_of_many_dimensions(targets, scratch):
    # 10^5 dims of 2^62: minutes of bignum products (a hang); 10^5 dims of 1: a 300 kB message
    for shape in ([2**62] * 100_000, [1] * 100_000 + [64]):
        k, data = _safetensors(targets, lambda h: h["model.norm.weight"].__setitem__("shape", shape))
        _rejected(targets["safetensors"], k, data, scratch, cpuq.FormatError,
                  "model.safetensors: tensor 'model.norm.weight': shape has 100", "dimensions (at most 32)")


@pytest.mark.parametrize("key, value", [("unk_token_id", 2**32), ("sep_token_id", 151936)])
def test_special_token_id_outside_the_vocabulary_is_skipped(targets, tmp_path, key, value):
    # as llama.cpp's SpecialVocab skips it; written, 2^32 was a struct.error in the writer and
    # 151936 (= vocab_size) a tokenizer key that cpuq.load rejects
    src = tmp_path / "src"
    src.mkdir()
    k = [s[0] for s in targets["config"].seeds].index("qwen2")
    for p in targets["config"].seeds[k][1].iterdir():
        if p.name != "config.json":
            (src / p.name).symlink_to(p)
    (src / "config.json").write_bytes(_config(targets, **{key: value}))
    dst = cpuq.convert(src, tmp_path / "x.gguf", "q8_0")
    with cpuq.open_gguf(dst) as f:
        assert [k for k in f.keys() if k.endswith(("unknown_token_id", "seperator_token_id"))] == []
    with cpuq.load(dst, n_ctx=16) as m:
        assert m.tokenizer.bos_id == 151643
