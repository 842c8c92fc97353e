"""infer/gguf.py on small GGUF files written here with the `gguf` package's GGUFWriter.

Each file is built from known HF-layout weights, with the Q/K rows permuted by this test's
own copy of llama.cpp's convert_hf_to_gguf formula, so reading it back checks the
un-permutation, the dequantization routing and the config metadata independently.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from infer.gguf import load_gguf  # noqa: E402
from infer.files import ConversionError  # noqa: E402
from infer.hf import hf_tensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, N, K, F, L = 256, 4, 2, 256, 2  # K-quants need rows of 256 values
H = D // N
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def _bytes_to_unicode():
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  extra = iter(range(256, 512))
  return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


TOKENS = SPECIALS + _bytes_to_unicode() + ["Ġt", "he", "Ġthe"]
V = len(TOKENS)


def llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute: HF half-split rows -> interleaved pairs."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_weights(seed=0, tie=False):
  rng = np.random.default_rng(seed)
  r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
  w = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": 1 + r(D)}
  if not tie:
    w["lm_head.weight"] = r(V, D)
  for i in range(L):
    p = f"model.layers.{i}."
    w.update({p + "self_attn.q_proj.weight": r(N * H, D),
              p + "self_attn.k_proj.weight": r(K * H, D),
              p + "self_attn.v_proj.weight": r(K * H, D),
              p + "self_attn.o_proj.weight": r(D, N * H),
              p + "mlp.gate_proj.weight": r(F, D), p + "mlp.up_proj.weight": r(F, D),
              p + "mlp.down_proj.weight": r(D, F), p + "input_layernorm.weight": 1 + r(D),
              p + "post_attention_layernorm.weight": 1 + r(D)})
  return w


def gguf_name(hf):
  table = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  if hf in table:
    return table[hf]
  layer, rest = hf.split(".")[2], ".".join(hf.split(".")[3:])
  return f"blk.{layer}." + {
      "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
      "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
      "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
      "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
      "post_attention_layernorm.weight": "ffn_norm.weight"}[rest]


# Where each K-quant block keeps its float16 scale(s) (ggml-common.h block layouts).
_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _encode(w, qtype, rng):
  """(raw data for GGUFWriter, the float values it holds) for a 2-D weight."""
  if qtype == "F32":
    return w, w
  if qtype == "F16":
    return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
  qt = Q[qtype]
  if qtype in _F16_FIELDS:  # no quantizer in gguf-py: random blocks with sane scales
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
      raw[..., off:off + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    raw = raw.reshape(w.shape[0], -1)
  else:
    raw = quants.quantize(w, qt)
  return raw, quants.dequantize(raw, qt)


def write_gguf(path, qtype="F32", *, tie=False, arch="llama", seed=0, meta=None, extra_tensors=(),
               rope_freqs=None, drop=(), tokenizer_model="gpt2"):
  """A tiny Llama GGUF; returns {hf name: the float weight as stored, in HF row order}."""
  rng = np.random.default_rng(seed + 1)
  writer = gguf.GGUFWriter(str(path), arch)
  meta = dict({"block_count": L, "context_length": 128, "embedding_length": D,
               "feed_forward_length": F, "attention.head_count": N, "attention.head_count_kv": K,
               "rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": 1e-5,
               "rope.dimension_count": H}, **(meta or {}))
  for key, value in meta.items():
    if isinstance(value, float):
      writer.add_float32(f"{arch}.{key}", value)
    elif isinstance(value, str):
      writer.add_string(f"{arch}.{key}", value)
    else:
      writer.add_uint32(f"{arch}.{key}", value)
  writer.add_tokenizer_model(tokenizer_model)
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(TOKENS)
  writer.add_token_types([3] * len(SPECIALS) + [1] * (V - len(SPECIALS)))
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                           "{% endfor %}")
  stored = {}
  for name, w in hf_weights(seed, tie).items():
    if name in drop:
      continue
    gname = gguf_name(name)
    if w.ndim == 1:
      writer.add_tensor(gname, w)
      stored[name] = w
      continue
    n_head = N if "q_proj" in name else K if "k_proj" in name else None
    g = llama_cpp_permute(w, n_head) if n_head else w
    raw, values = _encode(g, qtype, rng)
    writer.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=Q[qtype])
    # Back to HF row order with the inverse of the test's permutation (a transpose of axes).
    if n_head:
      values = values.reshape(n_head, -1, 2, D).swapaxes(1, 2).reshape(g.shape)
    stored[name] = values
  if rope_freqs is not None:
    writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
  for name, array, qt in extra_tensors:
    writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=qt)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return stored


def loaded_hf(path, **kw):
  cfg, params, tokenizer, extra = load_gguf(str(path), **kw)
  return cfg, dict(hf_tensors(cfg, params)), tokenizer, extra


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantizes_and_unpermutes_every_type(tmp_path, qtype):
  stored = write_gguf(tmp_path / "m.gguf", qtype)
  original = hf_weights()
  cfg, got, _, _ = loaded_hf(tmp_path / "m.gguf")
  assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.n_layers, cfg.vocab_size) == (
      D, N, K, F, L, V)
  assert not cfg.tie_embeddings
  assert set(got) == set(stored)
  for name, want in stored.items():
    np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6, err_msg=name)
    assert np.isfinite(want).all()
  if qtype in ("F32", "F16", "BF16", "Q8_0", "Q4_0"):  # close to the weights it encodes
    tol = {"F32": 0, "F16": 1e-3, "BF16": 2e-3, "Q8_0": 5e-3, "Q4_0": 0.06}[qtype]
    q = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_allclose(got[q], original[q], rtol=0, atol=tol)


def test_q8_0_by_hand(tmp_path):
  # Q8_0 decoded from its definition (ggml-common.h: f16 scale, then 32 int8 per block),
  # without gguf's dequantizer: pins down the layout end to end.
  write_gguf(tmp_path / "m.gguf", "Q8_0")
  reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
  t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
  blocks = np.asarray(t.data).reshape(F, D // 32, 34)
  scale = blocks[..., :2].copy().view(np.float16).astype(np.float32)
  values = (blocks[..., 2:].view(np.int8).astype(np.float32) * scale).reshape(F, D)
  _, got, _, _ = loaded_hf(tmp_path / "m.gguf")
  np.testing.assert_array_equal(got["model.layers.0.mlp.up_proj.weight"], values)


def test_tied_embeddings_and_scan_layout(tmp_path):
  write_gguf(tmp_path / "m.gguf", tie=True)
  cfg, params, _, _ = load_gguf(str(tmp_path / "m.gguf"), scan_layers=False)
  assert cfg.tie_embeddings and "lm_head" not in params and "layers_1" in params
  want = hf_weights(tie=True)
  np.testing.assert_array_equal(np.asarray(params["layers_1"]["mlp"]["down"]),
                                want["model.layers.1.mlp.down_proj.weight"].T)


def test_tokenizer_and_chat_template(tmp_path):
  write_gguf(tmp_path / "m.gguf")
  _, _, tokenizer, extra = loaded_hf(tmp_path / "m.gguf")
  ids = tokenizer.encode("<|im_start|> the 42<|im_end|>").ids
  byte = lambda c: TOKENS.index(c)  # noqa: E731
  assert ids == [1, TOKENS.index("Ġthe"), byte("Ġ"), byte("4"), byte("2"), 2]
  assert (extra["bos_token_id"], extra["eos_token_id"], extra["eos_token_ids"]) == (1, 2, (2,))
  assert extra["tokenizer_config"]["eos_token"] == "<|im_end|>"
  assert extra["chat_template"].startswith("{% for m in messages %}")


def _llama3_divisors(head_dim, theta, factor, low, high, orig):
  """convert_hf_to_gguf.py's rope_freqs for Llama 3.1 (divisors of each frequency)."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  out = []
  for f in freqs:
    wavelen = 2 * np.pi / f
    if wavelen < orig / high:
      out.append(1.0)
    elif wavelen > orig / low:
      out.append(factor)
    else:
      smooth = (orig / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


@pytest.mark.parametrize("theta, head_dim, orig", [(10000.0, 64, 64), (500000.0, 128, 8192)])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, theta, head_dim, orig):
  from model.layers import rope_inv_freq
  divisors = _llama3_divisors(head_dim, theta, 8.0, 1.0, 4.0, orig)
  assert ((divisors > 1) & (divisors < 8)).sum() >= 2
  write_gguf(tmp_path / "m.gguf", meta={"rope.freq_base": theta, "attention.key_length": head_dim,
                                        "attention.value_length": head_dim,
                                        "rope.dimension_count": head_dim,
                                        "attention.head_count": D // head_dim,
                                        "attention.head_count_kv": 1},
             rope_freqs=divisors, drop=[n for n in hf_weights() if "self_attn" in n])
  with pytest.raises(ConversionError, match="missing"):
    load_gguf(str(tmp_path / "m.gguf"))  # attention tensors dropped: config only here
  from infer.gguf import config_from_gguf, read_gguf
  cfg = config_from_gguf(read_gguf(str(tmp_path / "m.gguf")), "m.gguf")
  assert cfg.rope_scaling_factor == 8.0
  plain = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg)), plain / divisors, rtol=1e-5)


@pytest.mark.parametrize("meta, want", [
    ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, ("linear", 4.0)),
    ({"rope.scale_linear": 2.0}, ("linear", 2.0)),  # older files: llama.cpp's old key, no type
    ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, ("llama3", 0.0)),
])
def test_linear_rope_scaling_as_llama_cpp_reads_it(tmp_path, meta, want):
  from infer.gguf import config_from_gguf, read_gguf
  write_gguf(tmp_path / "m.gguf", meta=meta)
  cfg = config_from_gguf(read_gguf(str(tmp_path / "m.gguf")), "m.gguf")
  assert (cfg.rope_scaling_type, cfg.rope_scaling_factor) == want


@pytest.mark.parametrize("arch, meta, message", [
    ("llama", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0},
     r"llama\.rope\.scaling\.type='yarn' is not supported"),
    ("gemma2", {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0},
     r"gemma2\.rope\.scaling\.factor=4\.0 \(linear RoPE scaling\) is not supported"),
])
def test_unsupported_rope_scaling_names_the_key(tmp_path, arch, meta, message):
  from infer.gguf import config_from_gguf, read_gguf
  write_gguf(tmp_path / "m.gguf", arch=arch, meta=meta)
  with pytest.raises(ConversionError, match=r"m\.gguf: " + message):
    config_from_gguf(read_gguf(str(tmp_path / "m.gguf")), "m.gguf")


# ---- bad input ----------------------------------------------------------------------------

def _no_leftovers(parent, name):
  return not any(e.startswith(name) or e.startswith("." + name) for e in os.listdir(parent))


def test_truncated_gguf_names_file_and_tensor(tmp_path):
  from train.convert import convert
  path = tmp_path / "m.gguf"
  write_gguf(path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) * 2 // 3])
  with pytest.raises(ConversionError, match=r"m\.gguf: truncated: tensor '[^']+' ends at"):
    convert(f"gguf:{path}", f"orbax:{tmp_path / 'out'}")
  assert _no_leftovers(tmp_path, "out")
  path.write_bytes(b"GGUX" + data[4:])
  with pytest.raises(ConversionError, match=r"m\.gguf: not a readable GGUF file"):
    convert(f"gguf:{path}", f"hf:{tmp_path / 'out'}")
  path.write_bytes(data[:40])
  with pytest.raises(ConversionError, match=r"m\.gguf"):
    load_gguf(str(path))
  assert _no_leftovers(tmp_path, "out")


def test_unsupported_architecture(tmp_path):
  write_gguf(tmp_path / "m.gguf", arch="gpt2")
  with pytest.raises(ConversionError, match=r"m\.gguf: unsupported architecture 'gpt2'"):
    load_gguf(str(tmp_path / "m.gguf"))


def test_unsupported_tokenizer_model(tmp_path):
  write_gguf(tmp_path / "m.gguf", tokenizer_model="t5")
  with pytest.raises(ConversionError, match=r"m\.gguf: tokenizer.ggml.model='t5' is not "
                     r"supported \(supported: 'gpt2', byte-level BPE; 'llama', SentencePiece\)"):
    load_gguf(str(tmp_path / "m.gguf"))
  write_gguf(tmp_path / "m.gguf", tokenizer_model="llama")  # SentencePiece without scores
  with pytest.raises(ConversionError, match=r"m\.gguf: tokenizer.ggml.model='llama' "
                     r"\(SentencePiece\) needs 'tokenizer.ggml.scores'"):
    load_gguf(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("qtype", ["IQ4_NL", "I32"])
def test_unsupported_tensor_type(tmp_path, qtype):
  from train.convert import convert
  if qtype == "I32":
    array = np.zeros((D, D), np.int32)
  else:
    array = np.zeros((D, D // 32 * 18), np.uint8)
  write_gguf(tmp_path / "m.gguf", extra_tensors=[("blk.0.attn_q.weight", array, Q[qtype])],
             drop=["model.layers.0.self_attn.q_proj.weight"])
  with pytest.raises(ConversionError, match=rf"m\.gguf \(GGUF tensor 'blk\.0\.attn_q\.weight'\): "
                                            rf"type {qtype} is not supported"):
    convert(f"gguf:{tmp_path / 'm.gguf'}", f"hf:{tmp_path / 'out'}")
  assert _no_leftovers(tmp_path, "out")


def test_shape_mismatch_names_tensor(tmp_path):
  write_gguf(tmp_path / "m.gguf", meta={"feed_forward_length": 512})
  with pytest.raises(ConversionError, match=r"m\.gguf \(GGUF tensor 'blk\.0\.ffn_gate\.weight'\):"
                                            r" shape \(256, 256\) .* needs \(512, 256\)"):
    load_gguf(str(tmp_path / "m.gguf"))


def test_cli_gguf_to_hf(tmp_path):
  from infer.hf import load_hf
  write_gguf(tmp_path / "m.gguf", "Q8_0")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  cmd = [sys.executable, "train/convert.py", "--src", f"gguf:{tmp_path / 'm.gguf'}",
         "--dst", f"hf:{tmp_path / 'hf'}", "--dtype", "float32"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  cfg, params, tokenizer, extra = load_hf(str(tmp_path / "hf"))
  _, want, _, _ = loaded_hf(tmp_path / "m.gguf")
  for name, value in hf_tensors(cfg, params):
    np.testing.assert_array_equal(value, want[name])
  assert extra["chat_template"] and tokenizer.token_to_id("<|im_end|>") == 2
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "already exists" in proc.stderr
