"""The fixture checkpoints the converter is tested on: tiny HF checkpoints (tools/
make_tiny_checkpoint.py) and the real-weights Qwen2 one (tools/make_real_checkpoint.py).

CI checks their layout against HF's tensor names, and their tokenizer.json against
llama.cpp's Qwen2 tokenizer test vectors. The `peer` tests load them with transformers
(run in the separate torch venv, CPUQ_HF_VENV) and tokenize with llama.cpp (the peer
venv of tools/peer_env.sh).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer

import hf_tokenizer
import make_real_checkpoint
import make_tiny_checkpoint
from cpuq.convert.safetensors_io import open_checkpoint
from make_tiny_checkpoint import QWEN2_VOCAB, make_tiny_checkpoint as make_tiny

TOOLS = Path(__file__).resolve().parents[2] / "tools"
HF_VENV = Path(os.environ.get("CPUQ_HF_VENV", Path.home() / ".cache" / "cpuq-peer" / "hf-venv"))
HF_PYTHON = HF_VENV / "bin" / "python"


# (arch, dtype, tied, sharded): every architecture, every dtype, both head layouts and both file layouts.
VARIANTS = [
    ("qwen2", "bf16", True, False),
    ("qwen3", "bf16", True, True),
    ("llama", "f32", False, False),
    ("qwen2", "f16", False, True),
]
_IDS = ["-".join(str(x) for x in v) for v in VARIANTS]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[tuple, Path]:
    root = tmp_path_factory.mktemp("tiny_ckpt")
    return {v: make_tiny(root / "-".join(map(str, v)), arch=v[0], dtype=v[1], tied=v[2], sharded=v[3])
            for v in VARIANTS}


@pytest.fixture(scope="session")
def vocab_tests() -> list[tuple[str, list[int]]]:
    return hf_tokenizer.read_vocab_tests(QWEN2_VOCAB)


def expected_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes, written from the transformers modeling files
    (modeling_qwen2.py, modeling_qwen3.py, modeling_llama.py), not from the tool's table."""
    arch, d, ff, V = cfg["model_type"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim", d // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layer = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (ff, d), "mlp.up_proj.weight": (ff, d), "mlp.down_proj.weight": (d, ff),
    }
    if arch == "qwen2":  # Qwen2Attention: q/k/v Linear(bias=True)
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if arch == "qwen3":  # Qwen3Attention: RMSNorm(head_dim) on q and k, no biases
        layer.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    out = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        out.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, d)
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=_IDS)
def test_tiny_checkpoint_layout(tiny_dirs, variant):
    arch, dtype, tied, sharded = variant
    d = tiny_dirs[variant]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                     "llama": "LlamaForCausalLM"}[arch]]
    assert cfg["vocab_size"] == 151936  # the GGUF vocabulary's token count
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["torch_dtype"] == {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    # Qwen3 spells head_dim out and makes it differ from hidden/heads, as the real models do.
    assert ("head_dim" in cfg) == (arch == "qwen3")
    if arch == "qwen3":
        assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                "bos_token_id", "eos_token_id"):
        assert key in cfg, key
    assert (d / "model.safetensors.index.json").exists() == sharded
    assert (d / "model.safetensors").exists() == (not sharded)
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (d / f).exists(), f

    expected = expected_tensors(cfg)
    with open_checkpoint(d) as ck:
        assert {n: ck.shape(n) for n in ck.names} == expected
        st = {"bf16": "BF16", "f16": "F16", "f32": "F32"}[dtype]
        assert {ck.dtype(n) for n in ck.names} == {st}
        norm = ck.load_f32("model.norm.weight")
        emb = ck.load_f32("model.embed_tokens.weight")
        assert abs(norm.mean() - 1.0) < 0.05 and abs(emb.std() - 0.02) < 0.001


def test_tiny_checkpoint_is_deterministic_in_seed(tmp_path):
    small = dict(vocab_size=512, num_hidden_layers=1)
    a = make_tiny(tmp_path / "a", "qwen3", seed=3, **small) / "model.safetensors"
    b = make_tiny(tmp_path / "b", "qwen3", seed=3, **small) / "model.safetensors"
    c = make_tiny(tmp_path / "c", "qwen3", seed=4, **small) / "model.safetensors"
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_overrides_and_cli(tmp_path):
    make_tiny_checkpoint.main([str(tmp_path / "x"), "--arch", "llama", "--dtype", "f16", "--untied",
                               "--set", "num_hidden_layers=3", "--set", "vocab_size=1000"])
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["vocab_size"] == 1000 and not cfg["tie_word_embeddings"]
    with open_checkpoint(tmp_path / "x") as ck:
        assert {n: ck.shape(n) for n in ck.names} == expected_tensors(cfg)
        assert ck.dtype("lm_head.weight") == "F16"


def test_tokenizer_reproduces_llama_cpp_qwen2_vectors(tiny_dirs, vocab_tests):
    """Every (text, ids) pair of llama.cpp's ggml-vocab-qwen2.gguf.inp/.out, which
    llama.cpp's test-tokenizer-0 checks its own tokenizer against."""
    tok = Tokenizer.from_file(str(tiny_dirs[VARIANTS[0]] / "tokenizer.json"))
    mismatches = [(text, ids, tok.encode(text, add_special_tokens=False).ids) for text, ids in vocab_tests
                  if tok.encode(text, add_special_tokens=False).ids != ids]
    assert len(vocab_tests) == 46 and mismatches == []


def test_tokenizer_special_tokens_and_template(tiny_dirs):
    d = tiny_dirs[VARIANTS[0]]
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    for text, i in specials.items():
        assert tok.token_to_id(text) == i
        assert tok.encode(f"a{text}b", add_special_tokens=False).ids[1] == i  # one token, never split
    # llama.cpp's converter pads the vocabulary to vocab_size with [PAD<i>]; HF's tokenizer has no such tokens.
    assert tok.get_vocab_size() == 151646 and tok.token_to_id("[PAD151646]") is None
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()} == {i: t for t, i in specials.items()}
    prompt = jinja2.Environment().from_string(cfg["chat_template"]).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    # Verbatim from llama.cpp conversion/llama.py (LlamaModel.permute), the reference.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@pytest.mark.parametrize("n_head, n_head_kv, head_dim", [(9, 9, 64), (9, 3, 64), (4, 2, 16)])
def test_unpermute_inverts_llama_cpp_permute(n_head, n_head_kv, head_dim):
    w = np.random.default_rng(0).standard_normal((n_head_kv * head_dim, 24)).astype(np.float32)
    # attn_k rows are permuted per kv head (attn_q is the n_head == n_head_kv case).
    assert np.array_equal(make_real_checkpoint.unpermute(_llama_cpp_permute(w, n_head, n_head_kv), n_head_kv), w)


def test_real_checkpoint_tensor_names():
    names = ["token_embd.weight", "output_norm.weight", "output.weight"] + [
        f"blk.7.{t}.weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                                      "ffn_gate", "ffn_up", "ffn_down")]
    assert [make_real_checkpoint.hf_name(n) for n in names] == [
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.7.{t}.weight" for t in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                                               "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm",
                                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.slow
def test_fast_metadata_reader_agrees_with_cpuq():
    """The tools' metadata-only GGUF reader against cpuq's validated one (gguf-py)."""
    import cpuq
    for path in (QWEN2_VOCAB, make_real_checkpoint.smollm2_gguf()):
        with cpuq.open_gguf(path) as f:
            assert hf_tokenizer.read_gguf_metadata(path) == f.metadata()


@pytest.mark.slow
def test_real_checkpoint_builds(tmp_path):
    d = make_real_checkpoint.make_real_checkpoint(tmp_path / "real", "bf16")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"]
    with open_checkpoint(d) as ck:
        assert {n: ck.shape(n) for n in ck.names} == expected_tensors(cfg)
        assert not ck.load_f32("model.layers.3.self_attn.k_proj.bias").any()


# --- peer: transformers and llama.cpp ----------------------------------------------------

def _hf_check(model_dir: Path, tmp_path: Path, texts: list[str], *args: str) -> dict:
    if not HF_PYTHON.exists():
        pytest.skip(f"no transformers venv at {HF_VENV} (python3 -m venv; pip install torch transformers)")
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(texts))
    proc = subprocess.run([str(HF_PYTHON), str(TOOLS / "hf_check_checkpoint.py"), str(model_dir),
                           "--texts", str(texts_file), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _assert_params_match(report: dict, model_dir: Path) -> None:
    """transformers' loaded parameters are the values cpuq's reader returns."""
    with open_checkpoint(model_dir) as ck:
        for name in ck.names:
            got = report["params"][name]
            ours = ck.load_f32(name)
            assert got["shape"] == list(ours.shape), name
            assert got["head"] == ours.reshape(-1)[:4].tolist(), name  # float32 values: exact
            # float64 sums of the same float32 values in a different order: 1e-9 relative is generous.
            assert got["sum"] == pytest.approx(float(ours.astype(np.float64).sum()), rel=1e-9, abs=1e-9), name


@pytest.mark.peer
@pytest.mark.parametrize("variant", VARIANTS, ids=_IDS)
def test_transformers_loads_tiny_checkpoint(tiny_dirs, vocab_tests, tmp_path, variant):
    d = tiny_dirs[variant]
    report = _hf_check(d, tmp_path, [t for t, _ in vocab_tests])
    cfg = json.loads((d / "config.json").read_text())
    assert report["class"] == cfg["architectures"][0]
    assert report["missing_keys"] == [] and report["unexpected_keys"] == [] and report["mismatched_keys"] == []
    assert report["tied"] == cfg["tie_word_embeddings"]
    assert report["logits_finite"] and report["logits_shape"][-1] == cfg["vocab_size"]
    assert report["encodings"] == [ids for _, ids in vocab_tests]  # AutoTokenizer, not just `tokenizers`
    _assert_params_match(report, d)


def _llama_cpp_tokenize(gguf_path: Path, texts: list[str], tmp_path: Path) -> list[list[int]]:
    from ggml_oracle import PEER_VENV
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip("llama.cpp peer venv not built (tools/peer_env.sh)")
    (tmp_path / "in.json").write_text(json.dumps(texts))
    # special=True: HF tokenizers always match added special tokens in text; llama.cpp only when asked.
    code = ("import json, sys, llama_cpp\n"
            "m = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False)\n"
            "t = json.load(open(sys.argv[2]))\n"
            "print(json.dumps([m.tokenize(x.encode(), add_bos=False, special=True) for x in t]))\n")
    proc = subprocess.run([str(python), "-c", code, str(gguf_path), str(tmp_path / "in.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SMOLLM_TEXTS = ["12345 apples and 3.14159", "What is the capital of France?", "<|im_start|>user\nhi<|im_end|>\n",
                "I'm here, you'll see. DON'T", "²³ ½ ٣٤", "a\n\n\nb  \n \tc", "    def f(x):\n        return x"]


@pytest.mark.peer
def test_smollm2_tokenizer_matches_llama_cpp(vocab_tests, tmp_path):
    gguf_path = make_real_checkpoint.smollm2_gguf()
    texts = [t for t, _ in vocab_tests] + SMOLLM_TEXTS
    tok = hf_tokenizer.build_tokenizer(hf_tokenizer.read_gguf_metadata(gguf_path))
    assert [tok.encode(t, add_special_tokens=False).ids for t in texts] == _llama_cpp_tokenize(gguf_path, texts,
                                                                                               tmp_path)


@pytest.mark.peer
@pytest.mark.slow
def test_real_checkpoint_answers_with_transformers(tmp_path):
    d = make_real_checkpoint.make_real_checkpoint(tmp_path / "real", "f32")
    texts = SMOLLM_TEXTS
    report = _hf_check(d, tmp_path, texts, "--tokenizer", "file", "--chat", "What is the capital of France?",
                       "--max-new-tokens", "24")
    assert report["class"] == "Qwen2ForCausalLM" and report["tied"]
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []
    assert report["encodings_file"] == _llama_cpp_tokenize(make_real_checkpoint.smollm2_gguf(), texts, tmp_path)
    assert "Paris" in report["answer"], report["answer"]
    _assert_params_match(report, d)
