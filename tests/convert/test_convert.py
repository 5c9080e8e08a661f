"""cpuq.convert on tiny HF checkpoints (tools/make_tiny_checkpoint.py): every tensor read
back equals the source (f32 exactly; quantized types byte for byte against cpuq.quantize of
the float32 source), metadata keys, order and GGUF types are those docs/llama_cpp_conventions.md
lists for llama.cpp's convert_hf_to_gguf.py, and bad inputs raise the right CpuqError without
leaving a file behind. The byte comparison against llama.cpp's own converter is test_convert_peer.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import cpuq
from cpuq.arch import ModelConfig
from cpuq.convert.safetensors_io import open_checkpoint
from make_tiny_checkpoint import make_tiny_checkpoint


ARCHS = ["qwen2", "qwen3", "llama"]


@pytest.fixture(scope="module")
def checkpoints(module_tmp_factory) -> dict[str, Path]:
    root = module_tmp_factory.mktemp("ckpt")
    # llama untied (so lm_head -> output.weight is covered), qwen3 sharded.
    return {
        "qwen2": make_tiny_checkpoint(root / "qwen2", arch="qwen2", dtype="bf16", tied=True),
        "qwen3": make_tiny_checkpoint(root / "qwen3", arch="qwen3", dtype="bf16", tied=True, sharded=True),
        "llama": make_tiny_checkpoint(root / "llama", arch="llama", dtype="bf16", tied=False),
    }


@pytest.fixture(scope="module")
def converted(checkpoints, module_tmp_factory):
    out = module_tmp_factory.mktemp("gguf")
    cache = {}

    def get(arch: str, qtype: str) -> Path:
        if (arch, qtype) not in cache:
            cache[arch, qtype] = cpuq.convert(checkpoints[arch], out / f"{arch}-{qtype}.gguf", qtype)
        return cache[arch, qtype]
    return get


def _gguf_name(hf: str) -> str:
    """Independent restatement of the HF -> GGUF names (tensor_mapping.py), for the test."""
    table = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, n, module = stem.split(".", 3)
        return f"blk.{n}.{layer[module]}.{suffix}"
    return f"{table[stem]}.{suffix}"


def _llama_permuted(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute by its row formula: out row h*D + 2j + i = in row h*D + i*D/2 + j."""
    d = x.shape[0] // n_head
    src = np.empty(x.shape[0], dtype=np.int64)
    for h in range(n_head):
        for j in range(d // 2):
            for i in range(2):
                src[h * d + 2 * j + i] = h * d + i * (d // 2) + j
    return x[src]


def _source_tensors(ckpt_dir: Path) -> dict[str, np.ndarray]:
    """GGUF name -> float32 values the converter must write (after llama's q/k permutation)."""
    config = json.loads((ckpt_dir / "config.json").read_text())
    out = {}
    with open_checkpoint(ckpt_dir) as ckpt:
        for hf in ckpt.names:
            x = ckpt.load_f32(hf)
            if config["model_type"] == "llama" and (".q_proj." in hf or ".k_proj." in hf):
                heads = config["num_attention_heads"] if ".q_proj." in hf else config["num_key_value_heads"]
                x = _llama_permuted(x, heads)
            out[_gguf_name(hf)] = x
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_tensors_equal_source(arch, qtype, checkpoints, converted):
    path = converted(arch, qtype)
    source = _source_tensors(checkpoints[arch])
    with cpuq.open_gguf(path) as f:
        names = [t.name for t in f]
        assert sorted(names) == sorted(source)
        for t in f:
            x = source[t.name]
            assert t.shape == x.shape, t.name
            is_matrix = x.ndim == 2 and not t.name.endswith("_norm.weight")
            want_type = qtype.upper() if is_matrix else "F32"  # converter rules, ModelBase.prepare_tensors
            assert t.qtype.name == want_type, t.name
            if want_type == "F32":
                np.testing.assert_array_equal(cpuq.dequantize(t.data, "F32", t.shape), x, err_msg=t.name)
            else:
                # gguf-py's Q8_0 is bit-exact with ggml's (tests/quants check cpuq's against it).
                want = cpuq.quantize(x.reshape(-1, x.shape[-1]), "Q8_0")
                np.testing.assert_array_equal(t.data, want, err_msg=t.name)


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_order_is_the_converters(arch, checkpoints, converted):
    """Shards in name order, HF names sorted within each (ModelBase.index_tensors, notes 2.3)."""
    with open_checkpoint(checkpoints[arch]) as ckpt:
        shards = sorted({ckpt.file_of(n).name for n in ckpt.names})
        want = [_gguf_name(n) for s in shards for n in sorted(n for n in ckpt.names if ckpt.file_of(n).name == s)]
    with cpuq.open_gguf(converted(arch, "q8_0")) as f:
        assert [t.name for t in f] == want


QWEN2_KEYS = [  # the 26 keys the notes verified live (1.3), plus the sampling keys that the
    # fixture's generation_config.json (top_k, top_p, temperature, repetition_penalty) adds.
    "general.architecture", "general.type",
    "general.sampling.top_k", "general.sampling.top_p", "general.sampling.temp", "general.sampling.penalty_repeat",
    "general.name", "general.size_label",
    "qwen2.block_count", "qwen2.context_length", "qwen2.embedding_length", "qwen2.feed_forward_length",
    "qwen2.attention.head_count", "qwen2.attention.head_count_kv", "qwen2.rope.freq_base",
    "qwen2.attention.layer_norm_rms_epsilon", "general.file_type", "general.quantization_version",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
    "tokenizer.chat_template",
]


def _types(path: Path) -> dict[str, tuple[str, ...]]:
    r = gguf.GGUFReader(path)
    return {k: tuple(gguf.GGUFValueType(t).name for t in f.types) for k, f in r.fields.items()
            if not k.startswith("GGUF.")}


def test_metadata_qwen2(converted):
    path = converted("qwen2", "q8_0")
    with cpuq.open_gguf(path) as f:
        assert f.keys() == QWEN2_KEYS
        m = f.metadata()
    types = _types(path)
    assert m["general.architecture"] == "qwen2"
    assert m["general.file_type"] == 7 and m["general.quantization_version"] == 2
    assert (m["qwen2.block_count"], m["qwen2.embedding_length"], m["qwen2.feed_forward_length"]) == (2, 64, 128)
    assert (m["qwen2.attention.head_count"], m["qwen2.attention.head_count_kv"]) == (4, 2)
    assert m["qwen2.context_length"] == 32768
    assert m["qwen2.rope.freq_base"] == 1e6
    assert m["qwen2.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-6))
    assert m["general.sampling.top_k"] == 20 and types["general.sampling.top_k"] == ("INT32",)
    assert m["general.sampling.penalty_repeat"] == float(np.float32(1.05))
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "qwen2"
    # Qwen2 tokenizer ids (ggml-vocab-qwen2.gguf): tokenizer_config eos "<|im_end|>", config bos 151643.
    assert m["tokenizer.ggml.eos_token_id"] == 151645
    assert m["tokenizer.ggml.bos_token_id"] == 151643
    assert m["tokenizer.ggml.padding_token_id"] == 151643
    assert m["tokenizer.ggml.add_bos_token"] is False and m["tokenizer.ggml.add_eos_token"] is False
    tokens, token_type = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
    assert len(tokens) == len(token_type) == 151936
    assert tokens[151643] == "<|endoftext|>" and token_type[151643] == 3  # CONTROL
    assert token_type[0] == 1 and token_type[-1] in (3, 4, 5)
    assert m["tokenizer.ggml.merges"][0].count(" ") == 1
    assert m["tokenizer.chat_template"].strip()
    for key, want in {"general.file_type": ("UINT32",), "qwen2.block_count": ("UINT32",),
                      "qwen2.rope.freq_base": ("FLOAT32",), "tokenizer.ggml.token_type": ("ARRAY", "INT32"),
                      "tokenizer.ggml.tokens": ("ARRAY", "STRING"), "tokenizer.ggml.bos_token_id": ("UINT32",),
                      "tokenizer.ggml.add_bos_token": ("BOOL",)}.items():
        assert types[key] == want, key


def test_metadata_head_dim_and_llama_keys(converted):
    """key/value_length only where transformers' config has head_dim (qwen3, llama);
    llama adds vocab_size and rope.dimension_count after file_type (notes 1.3 #21-25)."""
    with cpuq.open_gguf(converted("qwen3", "q8_0")) as f:
        assert f.get("qwen3.attention.key_length") == 32 and f.get("qwen3.attention.value_length") == 32
    with cpuq.open_gguf(converted("qwen2", "q8_0")) as f:
        assert "qwen2.attention.key_length" not in f.keys()
    with cpuq.open_gguf(converted("llama", "f32")) as f:
        keys = f.keys()
        i = keys.index("general.file_type")
        assert keys[i:i + 4] == ["general.file_type", "llama.vocab_size", "llama.rope.dimension_count",
                                 "general.quantization_version"]
        assert f.get("general.file_type") == 0 and f.get("llama.rope.dimension_count") == 16
        assert f.get("llama.attention.layer_norm_rms_epsilon") == float(np.float32(1e-5))


def test_pure_kquant_falls_back_like_llama_quantize(checkpoints, tmp_path):
    """Row length 64 is not a multiple of 256: Q4_K -> Q5_0 (tensor_type_fallback), on the
    F16-rounded weights llama-quantize reads; llama-quantize's tensor and key order."""
    path = cpuq.convert(checkpoints["qwen2"], tmp_path / "q4k.gguf", "q4_k")
    source = _source_tensors(checkpoints["qwen2"])
    with cpuq.open_gguf(path) as f:
        assert f.keys()[-2:] == ["general.quantization_version", "general.file_type"]
        assert f.get("general.file_type") == 15
        names = [t.name for t in f]
        assert names[:2] == ["output_norm.weight", "token_embd.weight"]
        assert names[2].startswith("blk.0.attn_k.bias")
        for t in f:
            x = source[t.name]
            if t.qtype.name == "F32":
                np.testing.assert_array_equal(cpuq.dequantize(t.data, "F32", t.shape), x)
                continue
            assert t.qtype.name == "Q5_0", t.name
            x16 = x.astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(t.data, cpuq.quantize(x16, "Q5_0"), err_msg=t.name)


def test_progress_counts_checkpoint_bytes(checkpoints, tmp_path):
    seen = []
    cpuq.convert(checkpoints["qwen3"], tmp_path / "p.gguf", "f16",
                 progress=lambda done, total, name: seen.append((done, total, name)))
    total = sum(f.stat().st_size for f in checkpoints["qwen3"].glob("*.safetensors"))
    assert seen[-1][0] == seen[-1][1]
    assert 0.99 * total < seen[-1][1] < total  # the file less its JSON header
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:])) and len({t for _, t, _ in seen}) == 1
    with cpuq.open_gguf(tmp_path / "p.gguf") as f:
        assert [n for n in dict.fromkeys(name for _, _, name in seen)] == list(f.tensors)
        assert f.tensor("token_embd.weight").qtype.name == "F16"
        assert f.tensor("blk.0.attn_q_norm.weight").qtype.name == "F32"
        assert f.get("general.file_type") == 1


@pytest.mark.parametrize("arch, qtype", [("qwen2", "q4_k_m"), ("llama", "q8_0"), ("qwen3", "f32")])
def test_pieces_write_the_same_file(arch, qtype, checkpoints, tmp_path, monkeypatch):
    """Streaming a tensor in blocks of rows (here 1000 weights a piece, so the embedding
    goes in ~9700 pieces and rows never align with pieces) writes the bytes a
    whole-tensor pass writes."""
    from cpuq.convert import pipeline
    whole = cpuq.convert(checkpoints[arch], tmp_path / "whole.gguf", qtype)
    monkeypatch.setattr(pipeline, "PIECE_WEIGHTS", 1000)
    calls = []
    pieces = cpuq.convert(checkpoints[arch], tmp_path / "pieces.gguf", qtype,
                          progress=lambda *a: calls.append(a))
    assert len(calls) > 9000
    assert whole.read_bytes() == pieces.read_bytes()


# bad inputs ------------------------------------------------------------------

def _copy_checkpoint(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p)
    config = json.loads((src / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _assert_nothing_written(out_dir: Path) -> None:
    assert list(out_dir.iterdir()) == [], "the failed conversion left files behind"


@pytest.mark.parametrize("change, error, words", [
    ({"architectures": ["MistralForCausalLM"]}, cpuq.UnsupportedError, ["MistralForCausalLM", "Qwen2ForCausalLM"]),
    ({"num_hidden_layers": 3}, cpuq.FormatError, ["model.layers.2.", "missing"]),
    ({"intermediate_size": 96}, cpuq.FormatError, ["mlp.", "shape", "96"]),
    ({"hidden_size": None}, cpuq.FormatError, ["config.json", "hidden_size"]),
])
def test_bad_checkpoint(change, error, words, checkpoints, tmp_path):
    src = _copy_checkpoint(checkpoints["qwen2"], tmp_path / "src", **change)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(error) as e:
        cpuq.convert(src, out / "x.gguf", "q8_0")
    for w in words:
        assert w in str(e.value)
    _assert_nothing_written(out)


def test_missing_config(checkpoints, tmp_path):
    src = _copy_checkpoint(checkpoints["qwen2"], tmp_path / "src")
    (src / "config.json").unlink()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(cpuq.InputError, match="config.json"):
        cpuq.convert(src, out / "x.gguf")
    _assert_nothing_written(out)


def test_interrupt_removes_partial_file(checkpoints, tmp_path):
    def stop(done, total, name):
        if name.startswith("blk.1."):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        cpuq.convert(checkpoints["qwen2"], tmp_path / "x.gguf", "q8_0", progress=stop)
    _assert_nothing_written(tmp_path)


def test_no_disk_space_checked_before_writing(checkpoints, tmp_path, monkeypatch):
    from cpuq.convert import pipeline
    real = shutil.disk_usage
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    with pytest.raises(cpuq.InputError, match=r"not enough disk space for x\.gguf: it needs about \d+ MiB, 0 MiB"):
        cpuq.convert(checkpoints["qwen2"], tmp_path / "x.gguf", "q8_0")
    _assert_nothing_written(tmp_path)


def test_write_failure_mid_file_leaves_nothing(checkpoints, tmp_path):
    """A real failing write(2): the file-size limit (RLIMIT_FSIZE) stops the output at
    2 MB, a few tensors in, as a full disk would (EFBIG instead of ENOSPC; same path)."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))\n"
        "from cpuq.cli import app\n"
        "sys.argv = ['cpuq', 'convert', sys.argv[1], '-o', sys.argv[2], '--type', 'f32']\n"
        "app()\n")
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", code, str(checkpoints["qwen2"]), str(out / "x.gguf")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "x.gguf: File too large while writing; nothing was written" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    _assert_nothing_written(out)


def test_destination_rules(checkpoints, tmp_path):
    dst = tmp_path / "x.gguf"
    dst.write_bytes(b"keep me")
    with pytest.raises(cpuq.InputError, match="already exists"):
        cpuq.convert(checkpoints["qwen2"], dst, "f32")
    assert dst.read_bytes() == b"keep me"
    cpuq.convert(checkpoints["qwen2"], dst, "f32", force=True)
    with cpuq.open_gguf(dst) as f:
        assert f.get("general.file_type") == 0
    with pytest.raises(cpuq.InputError, match="inside the checkpoint"):
        cpuq.convert(checkpoints["qwen2"], checkpoints["qwen2"] / "x.gguf")
    with pytest.raises(cpuq.UnsupportedError, match="q3_k"):
        cpuq.convert(checkpoints["qwen2"], tmp_path / "y.gguf", "q3_k")
    assert not (checkpoints["qwen2"] / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


# ModelConfig -------------------------------------------------------------------

def test_model_config_defaults_and_rope(tmp_path):
    base = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 1000}
    cfg = ModelConfig.from_hf_dict(base)
    # Qwen3Config defaults (transformers): head_dim 128, rope_theta 10000, rms_norm_eps 1e-6, 32768 positions.
    assert (cfg.arch, cfg.head_dim, cfg.n_head_kv, cfg.rope_theta, cfg.rms_eps, cfg.context_length) == \
        ("qwen3", 128, 4, 10000.0, 1e-6, 32768)
    yarn = ModelConfig.from_hf_dict({**base, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 32768}})
    assert yarn.rope_type == "yarn"
    with pytest.raises(cpuq.FormatError, match="num_attention_heads"):
        ModelConfig.from_hf_dict({**base, "num_attention_heads": "4"})
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(cpuq.FormatError, match="config.json"):
        ModelConfig.from_hf_config(tmp_path)


# general.* name keys -------------------------------------------------------------

MODEL_IDS = ["Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/smollm2-135M-8k-lc100k-mix1-ep2", "real32",
             "tiny-qwen2", "Meta-Llama-3.1-8B-Instruct", "bloom-7b1", "Qwen3-0.6B", "phi-3-mini-4k-instruct",
             "Mistral-7B-v0.3", "my model", "./foo-1.5B", "gpt2-xl-q4_k", "iter12-7B", "x--y", ""]


@pytest.mark.parametrize("total_params", [0, 134515008, 494032768])
def test_model_id_parsing_matches_gguf_py(total_params):
    """The reference is gguf-py's own heuristic (Metadata.get_model_id_components), as installed."""
    from gguf.metadata import Metadata
    from cpuq.convert.naming import parse_model_id
    for model_id in MODEL_IDS:
        m = parse_model_id(model_id, total_params)
        assert (m.name, m.organization, m.basename, m.finetune, m.version, m.size_label) == \
            Metadata.get_model_id_components(model_id, total_params), model_id


def test_general_name_keys_examples():
    """Examples worked out in docs/llama_cpp_conventions.md 1.4."""
    from cpuq.convert.naming import general_name_keys
    assert general_name_keys("HuggingFaceTB/smollm2-135M-8k-lc100k-mix1-ep2", "x", 134515008) == {
        "general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "general.organization": "HuggingFaceTB",
        "general.finetune": "8k-lc100k-mix1-ep2", "general.basename": "smollm2", "general.size_label": "135M"}
    assert general_name_keys("/home/me/models/x", "real32", 134515008) == {
        "general.name": "Real32", "general.size_label": "135M"}


def test_use_more_bits_table():
    """The layer table of docs/llama_cpp_conventions.md 4.3 (30 matches the SmolLM2 reference file)."""
    from cpuq.convert.pipeline import use_more_bits
    table = {16: [0, 1, 4, 7, 10, 13, 14, 15], 24: [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23],
             30: [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29],
             32: [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]}
    for n, layers in table.items():
        assert [i for i in range(n) if use_more_bits(i, n)] == layers, n


def test_q4_k_m_types_on_narrow_rows(checkpoints, tmp_path):
    """Row length 64 (notes 4.4-4.5): Q6_K -> Q8_0 and Q4_K -> Q5_0; 1-D tensors stay F32."""
    path = cpuq.convert(checkpoints["llama"], tmp_path / "m.gguf", "q4_k_m")
    with cpuq.open_gguf(path) as f:
        types = {t.name: t.qtype.name for t in f}
        assert f.get("general.file_type") == 15
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q5_0"
    assert types["blk.0.attn_v.weight"] == "Q5_0" and types["blk.1.attn_v.weight"] == "Q8_0"
    # ffn_down rows are n_ff = 128 long: layer 1 (more bits) Q6_K -> Q8_0, layer 0 Q4_K -> Q5_0.
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q5_0"
    assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}
