"""GGUF export (infer/gguf_export.py, train/convert.py --dst gguf:), read back three ways.

* gguf-py's reader: metadata values, tensor types, and every tensor against this file's own
  copy of convert_hf_to_gguf's conventions (Q/K rows interleaved per head) applied to our
  weights, quantized and dequantized with gguf.quants;
* our importer (infer/gguf.py, itself checked against transformers per family in
  test_convert_families.py): an f32 file gives our logits; a q8_0 file gives the logits of
  our weights quantized and dequantized independently;
* transformers' GGUF loader, an independent reading of llama.cpp's conventions, Q/K row order
  included: its logits equal ours.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from infer import workdir  # noqa: E402
from infer.files import ConversionError  # noqa: E402
from infer.gguf import load_gguf  # noqa: E402
from infer.gguf_export import save_gguf  # noqa: E402
from infer.hf import ArraySource, hf_tensors, params_from_source  # noqa: E402
from infer.hf_config import FAMILIES  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

TEXTS = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog 123"]
PROMPT = "the quick brown fox 42 <|im_start|>def"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
BASE = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
            max_seq_len=64, tie_embeddings=False)


@pytest.fixture(scope="module")
def tokenizer():
  """A byte-level BPE as training makes them (<|endoftext|> id 0), plus an added special
  token and an added plain one; 300 tokens, under the model's 320 rows."""
  from tokenizers import AddedToken
  from train.tokenizer import train_tokenizer
  tok = train_tokenizer(TEXTS * 20, 298)
  tok.add_special_tokens(["<|im_start|>"])
  tok.add_tokens([AddedToken("<fn>", normalized=False)])
  return tok


def random_params(cfg: ModelConfig, seed=0):
  """Every parameter random (norm scales around 1), so that no mapping hides."""
  abstract, shardings = workdir.abstract_params(cfg)
  rng = np.random.default_rng(seed)
  flat, out = traverse_util.flatten_dict(abstract), {}
  for path, a in flat.items():
    x = rng.standard_normal(a.shape).astype(np.float32) * 0.2
    out[path] = 1 + x if path[-1] == "scale" else x
  return jax.device_put(traverse_util.unflatten_dict(out), shardings)


@functools.lru_cache(maxsize=None)
def _forward(cfg: ModelConfig):
  return jax.jit(lambda p, t, pos: Transformer(cfg).apply({"params": p}, t, pos)[0])


def logits(cfg, params, ids):
  ids = jnp.asarray([ids])
  return np.asarray(_forward(cfg)(params, ids, jnp.arange(ids.shape[1])[None])[0])


def llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute: HF half-split rows -> interleaved pairs."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf):
  top = {"model.embed_tokens.weight": "token_embd.weight",
         "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  if hf in top:
    return top[hf]
  _, _, layer, *rest = hf.split(".")
  return f"blk.{layer}." + {
      "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
      "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
      "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
      "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
      "post_attention_layernorm.weight": "ffn_norm.weight"}[".".join(rest)]


def expected_type(name, shape, qtype, tied):
  """The type rules of the export (llama.cpp's): 1-D F32, the 4/5-bit types' output matrix
  Q8_0, rows not a multiple of the block F16."""
  if len(shape) == 1:
    return Q.F32
  if name == ("token_embd.weight" if tied else "output.weight") and qtype in (Q.Q4_0, Q.Q4_1):
    return Q.Q8_0
  return Q.F16 if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] else qtype


def quantized_hf(cfg, params, qtype):
  """{HF name: the float weight a `qtype` export holds}, by this file's rules and gguf.quants
  (quantizing is row-wise, so the Q/K row order does not change the values)."""
  out = {}
  for name, w in hf_tensors(cfg, params):
    t = expected_type(gguf_name(name), w.shape, qtype, cfg.tie_embeddings)
    out[name] = quants.dequantize(quants.quantize(w, t), t).reshape(w.shape)
  return out


def export(tmp_path, cfg, params, tokenizer, gguf_type, **config):
  path = str(tmp_path / "m.gguf")
  save_gguf(path, cfg, params, tokenizer, dict({"chat_template": TEMPLATE}, **config),
            gguf_type=gguf_type, name="m")
  return path


# ---- gguf-py's reader ----------------------------------------------------------------------

def test_cli_writes_metadata_types_and_llama_cpp_rows(tmp_path, tokenizer):
  # orbax run directory -> train/convert.py --dst gguf: --gguf_type q8_0, read with gguf-py.
  from train.convert import Pretrained, main, write
  cfg = ModelConfig(**BASE)
  params = random_params(cfg)
  write(Pretrained(cfg, params, tokenizer, {"chat_template": TEMPLATE}),
        f"orbax:{tmp_path / 'run'}")
  out = tmp_path / "out" / "m.gguf"
  assert main(["--src", f"orbax:{tmp_path / 'run'}", "--dst", f"gguf:{out}",
               "--gguf_type", "q8_0"]) == 0
  reader = gguf.GGUFReader(str(out))
  meta = {k: f.contents() for k, f in reader.fields.items()}
  assert {k: meta[k] for k in (
      "general.architecture", "general.name", "llama.context_length",
      "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
      "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
      "llama.rope.dimension_count", "llama.vocab_size", "tokenizer.ggml.model",
      "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
      "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "general.file_type")} == {
      "general.architecture": "llama", "general.name": "m", "llama.context_length": 64,
      "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 48,
      "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
      "llama.rope.freq_base": 10000.0, "llama.rope.dimension_count": 16,
      "llama.vocab_size": 320, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
      # Training puts <|endoftext|> (id 0) on both sides of a document.
      "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
      "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": TEMPLATE,
      "general.file_type": gguf.LlamaFileType.MOSTLY_Q8_0}
  assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
  assert "llama.attention.key_length" not in meta  # head_dim is d_model / n_heads
  # The vocabulary: by id, padded to the embedding's rows as convert_hf_to_gguf pads.
  tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  assert len(tokens) == 320 and tokens[:300] == sorted(vocab, key=vocab.get)
  assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)]
  assert [types[vocab[t]] for t in ("<|endoftext|>", "<|im_start|>", "<fn>", "a")] == [
      3, 3, 4, 1]
  assert set(types[300:]) == {5}
  merges = json.loads(tokenizer.to_str())["model"]["merges"]  # rank order, as pairs
  assert meta["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in merges] and merges
  # Tensors: norms F32, ffn_down (rows of 48) F16, the rest Q8_0; Q/K rows interleaved.
  hf = dict(hf_tensors(cfg, params))
  stored = {t.name: t for t in reader.tensors}
  assert set(stored) == {gguf_name(n) for n in hf}
  for name, w in hf.items():
    t = stored[gguf_name(name)]
    assert t.tensor_type == expected_type(t.name, w.shape, Q.Q8_0, False), t.name
    heads = 4 if "q_proj" in name else 2 if "k_proj" in name else 0
    want = llama_cpp_permute(w, heads) if heads else w
    want = quants.dequantize(quants.quantize(want, t.tensor_type), t.tensor_type)
    got = quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    np.testing.assert_array_equal(got, want.reshape(w.shape), err_msg=t.name)
  assert {stored["blk.0.ffn_down.weight"].tensor_type, stored["blk.0.attn_q.weight"].tensor_type,
          stored["blk.0.attn_norm.weight"].tensor_type} == {Q.F16, Q.Q8_0, Q.F32}


# ---- our importer ----------------------------------------------------------------------

def test_f32_reimports_as_the_same_model(tmp_path, tokenizer):
  cfg = ModelConfig(**dict(BASE, head_dim=24))  # head_dim != d_model / n_heads
  params = random_params(cfg)
  path = export(tmp_path, cfg, params, tokenizer, "f32")
  cfg2, params2, tok2, extra = load_gguf(path)
  assert cfg2.head_dim == 24 and not cfg2.tie_embeddings
  ids = tokenizer.encode(PROMPT).ids
  assert tok2.encode(PROMPT, add_special_tokens=False).ids == ids
  assert tok2.encode(PROMPT).ids == [0] + ids  # add_bos: training's document start
  assert extra["chat_template"] == TEMPLATE and extra["eos_token_ids"] == (0,)
  np.testing.assert_allclose(logits(cfg2, params2, ids), logits(cfg, params, ids),
                             rtol=0, atol=1e-5)


@pytest.mark.parametrize("gguf_type, qtype", [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)])
def test_quantized_reimports_as_the_dequantized_model(tmp_path, tokenizer, gguf_type, qtype):
  cfg = ModelConfig(**dict(BASE, tie_embeddings=True))
  params = random_params(cfg)
  path = export(tmp_path, cfg, params, tokenizer, gguf_type)
  reader = gguf.GGUFReader(path)
  names = {t.name: t.tensor_type for t in reader.tensors}
  assert "output.weight" not in names and names["token_embd.weight"] == (
      Q.Q8_0 if gguf_type == "q4_0" else qtype)
  cfg2, params2, _, _ = load_gguf(path)
  assert cfg2.tie_embeddings
  reference = params_from_source(cfg, ArraySource(quantized_hf(cfg, params, qtype), "ref"))
  ids = tokenizer.encode(PROMPT).ids
  np.testing.assert_allclose(logits(cfg2, params2, ids), logits(cfg, reference, ids),
                             rtol=0, atol=1e-5)


_OPTIONS = {  # each family's options beyond BASE; head_dim 16
    "qwen2": dict(FAMILIES["Qwen2ForCausalLM"].options),
    "qwen3": dict(FAMILIES["Qwen3ForCausalLM"].options, tie_embeddings=True),
    "gemma2": dict(FAMILIES["Gemma2ForCausalLM"].options, sliding_window=5, global_every=2,
                   attn_softcap=20.0, final_softcap=30.0),
    "gemma3": dict(FAMILIES["Gemma3ForCausalLM"].options, n_layers=6, sliding_window=5,
                   global_every=6, rope_theta=1e6, rope_local_theta=1e4, tie_embeddings=True),
    "mixtral": dict(n_experts=4, n_experts_per_token=2, moe_d_ff=32),
    "qwen3moe": dict(FAMILIES["Qwen3MoeForCausalLM"].options, n_experts=4, moe_d_ff=32),
    "llama3_rope": dict(rope_scaling_factor=8.0, rope_original_max_len=16),
}


@pytest.mark.parametrize("family", list(_OPTIONS))
def test_every_family_reimports_as_the_same_model(tmp_path, tokenizer, family):
  cfg = ModelConfig(**dict(BASE, **_OPTIONS[family]))
  params = random_params(cfg)
  path = export(tmp_path, cfg, params, tokenizer, "f32")
  cfg2, params2, _, _ = load_gguf(path)
  ids = tokenizer.encode(PROMPT).ids  # 20 tokens: past the windows of 5
  np.testing.assert_allclose(logits(cfg2, params2, ids), logits(cfg, params, ids),
                             rtol=0, atol=1e-5)


# ---- transformers' GGUF loader -------------------------------------------------------------

def test_transformers_reads_the_same_model(tmp_path, tokenizer):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")  # transformers' GGUF loading needs it (the test extra has it)
  cfg = ModelConfig(**BASE)
  params = random_params(cfg)
  export(tmp_path, cfg, params, tokenizer, "f32")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
  assert type(model).__name__ == "LlamaForCausalLM"
  ids = tokenizer.encode(PROMPT).ids
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(theirs, logits(cfg, params, ids), rtol=1e-4, atol=1e-4)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  assert hf_tok(PROMPT, add_special_tokens=False).input_ids == ids


def test_llama_cpp_runs_the_same_model(tmp_path, tokenizer):
  """llama.cpp itself, where llama-cpp-python is installed (it compiles llama.cpp, so the
  test extra leaves it out): the file loads, and its logits and tokenizer are ours."""
  llama_cpp = pytest.importorskip("llama_cpp")
  cfg = ModelConfig(**BASE)
  params = random_params(cfg)
  export(tmp_path, cfg, params, tokenizer, "f32")
  llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True,
                        verbose=False, n_threads=1)
  ids = tokenizer.encode(PROMPT).ids
  assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids
  llm.eval(ids)
  np.testing.assert_allclose(np.asarray(llm.scores[:len(ids)]), logits(cfg, params, ids),
                             atol=1e-2)



# ---- bad input -----------------------------------------------------------------------------

def test_bad_flags_are_errors_that_write_nothing(tmp_path, capsys):
  from train.convert import main
  src = f"orbax:{tmp_path / 'missing'}"
  assert main(["--src", src, "--dst", f"gguf:{tmp_path / 'm.gguf'}",
               "--gguf_type", "q4_k"]) == 1
  assert "--gguf_type='q4_k': not one of ['f32', 'f16', 'bf16', 'q8_0'" in capsys.readouterr().err
  assert main(["--src", src, "--dst", f"hf:{tmp_path / 'hf'}", "--gguf_type", "q8_0"]) == 1
  assert "--gguf_type='q8_0' is for gguf destinations, not hf" in capsys.readouterr().err
  assert main(["--src", src, "--dst", f"gguf:{tmp_path / 'm.gguf'}", "--dtype",
               "bfloat16"]) == 1
  assert "--dtype does not apply to a gguf destination" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_what_llama_cpp_cannot_run_is_refused(tmp_path, tokenizer):
  from tokenizers import Tokenizer, models, pre_tokenizers
  cfg = ModelConfig(**dict(BASE, sliding_window=8))  # Mistral v0.1: llama.cpp has no window
  with pytest.raises(ConversionError, match=r"llama.cpp's 'llama' architecture would run "
                                            r"another model .*sliding_window=8 \(llama.cpp: 0\)"):
    export(tmp_path, cfg, random_params(cfg), tokenizer, "f16")
  cfg = ModelConfig(**BASE)
  params = random_params(cfg)
  # SentencePiece-style (tests/test_convert_gguf_spm.py) but without the 256 byte tokens,
  # whose lack would stop llama.cpp at the first character outside the vocabulary.
  spm = Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], byte_fallback=True, unk_token="<unk>"))
  spm.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
  with pytest.raises(ConversionError, match=r"byte fallback without the byte token\(s\) "
                                            r"\['<0x00>'.* \(256 of 256\)"):
    export(tmp_path, cfg, params, spm, "f16")
  with pytest.raises(ConversionError, match=r"needs the model's tokenizer"):
    export(tmp_path, cfg, params, None, "f16")
  assert os.listdir(tmp_path) == []  # nothing half-written left behind

