"""GGUF (llama.cpp) files: model config, dequantized parameters and an HF tokenizer.

    cfg, params, tokenizer, extra = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

Architectures (`general.architecture`): llama (and Mixtral, which llama.cpp writes as llama
with experts; Mistral too, whose sliding window llama.cpp's llama ignores, as we do), qwen2,
qwen3, qwen3moe, gemma2 and gemma3 (text). Each is read as the HF family with its options
(infer/hf.py FAMILIES), with what llama.cpp assumes where the file says nothing (Gemma's
local/global pattern, local RoPE base and attention scale).

Tensors are renamed to their HF names and go through infer/hf.py's mapping, after
GGUF-specific steps:
  * dequantization (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K) with the
    `gguf` package's reference numpy code;
  * undoing llama.cpp's Q/K row permutation (its llama architecture only). llama.cpp rotates
    adjacent pairs (x[2i], x[2i+1]) in RoPE there, HF (and we) rotate halves (x[i],
    x[i + H/2]), so convert_hf_to_gguf interleaves each head's rows; we put them back. Its
    qwen and gemma architectures rotate halves like HF and are stored as they are;
  * Gemma: convert_hf_to_gguf stores each norm's 1 + w (llama.cpp multiplies by the weight
    itself); we subtract the 1 again;
  * experts: one [E, F, D] tensor per layer and weight, split into HF's per-expert tensors.
The tokenizer is rebuilt as an HF `tokenizers` one that encodes as llama.cpp does, with control
tokens as special tokens: a byte-level BPE ("gpt2") from the vocab, merges, token types and the
`tokenizer.ggml.pre` pre-tokenizer name; a SentencePiece one ("llama": Llama 2, Mistral, Gemma)
from the vocab, scores and token types.
"""

import dataclasses
import math
import os
import re

import numpy as np

from infer.files import ConversionError
from infer.hf import ArraySource, hf_shapes, layer_name, layer_tensors, params_from_source
from infer.hf_config import FAMILIES
from model import ModelConfig


@dataclasses.dataclass(frozen=True)
class _Arch:
  """How llama.cpp stores and runs one `general.architecture`."""
  family: str  # the HF architecture (infer/hf.py FAMILIES) whose options it has
  permute_qk: bool = False  # q/k rows interleaved for llama.cpp's pairwise RoPE
  norm_shift: float = 0.0  # added to every norm weight by convert_hf_to_gguf (Gemma's 1 + w)
  swa_period: int = 0  # llama.cpp's fixed local/global period (Gemma 2: 2, Gemma 3: 6)
  swa_window: int = 0  # the window when the file names none
  swa_theta: float = 0.0  # llama.cpp's fixed RoPE base of the local layers; 0: the global one
  softcaps: tuple[float, float] = (0.0, 0.0)  # attention and final caps the file may override
  big_layers: int = 0  # the block count of the size whose attention scale is (D/N)^-0.5


_ARCHITECTURES = {
    "llama": _Arch("LlamaForCausalLM", permute_qk=True),  # with experts: Mixtral
    "qwen2": _Arch("Qwen2ForCausalLM"),
    "qwen3": _Arch("Qwen3ForCausalLM"),
    "qwen3moe": _Arch("Qwen3MoeForCausalLM"),
    "gemma2": _Arch("Gemma2ForCausalLM", norm_shift=1.0, swa_period=2, swa_window=4096,
                    softcaps=(50.0, 30.0), big_layers=46),
    "gemma3": _Arch("Gemma3ForCausalLM", norm_shift=1.0, swa_period=6, swa_theta=10000.0,
                    big_layers=62),
}
_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                    "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp token types (llama_token_type / gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# The types a SentencePiece merge may produce: text can spell them (not control, unknown or
# byte tokens).
_MERGEABLE = (_NORMAL, _USER_DEFINED, _UNUSED)
_TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE, SentencePiece
# Architectures whose SentencePiece ("llama") vocabulary is Gemma's: see _gemma_vocab.
_GEMMA_VOCABS = ("gemma", "gemma2", "gemma3")
_SPACE = "\u2581"  # "▁": SentencePiece's visible space

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF's per-layer names ("blk.{i}." + name; gguf-py's TENSOR_NAMES) -> our parameter
# (infer/hf.py's layer_tensors then gives the family's HF name). ffn_norm is the norm before
# the feed-forward in every family: HF Llama's post_attention_layernorm, Gemma's
# pre_feedforward_layernorm; Gemma's post_attention_norm follows the attention.
_LAYER_NAMES = {
    "attn_q.weight": ("attn", "q"), "attn_k.weight": ("attn", "k"),
    "attn_v.weight": ("attn", "v"), "attn_output.weight": ("attn", "o"),
    "attn_q.bias": ("attn", "q_bias"), "attn_k.bias": ("attn", "k_bias"),
    "attn_v.bias": ("attn", "v_bias"),
    "attn_q_norm.weight": ("attn", "q_norm", "scale"),
    "attn_k_norm.weight": ("attn", "k_norm", "scale"),
    "attn_norm.weight": ("attn_norm", "scale"), "ffn_norm.weight": ("mlp_norm", "scale"),
    "post_attention_norm.weight": ("post_attn_norm", "scale"),
    "post_ffw_norm.weight": ("post_mlp_norm", "scale"),
    "ffn_gate.weight": ("mlp", "gate"), "ffn_up.weight": ("mlp", "up"),
    "ffn_down.weight": ("mlp", "down"),
    "ffn_gate_inp.weight": ("moe", "router"), "ffn_gate_exps.weight": ("moe", "gate"),
    "ffn_up_exps.weight": ("moe", "up"), "ffn_down_exps.weight": ("moe", "down"),
}
_ROPE_FREQS = "rope_freqs.weight"  # Llama-3.1 scaling as per-frequency divisors

# Pre-tokenizer regexes, as llama.cpp's llama-vocab.cpp splits text for each `pre` name,
# written the way the models' own HF tokenizer.json files write them.
# "gpt-2" first: export writes the first name that splits alike, and llama.cpp knows "gpt-2",
# not "gpt2" (files in the wild carry both; import reads both).
_GPT2 = ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais", "trillion")
_GPT2_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_SPLIT_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_IGNORE_MERGES = ("llama-bpe",)  # llama.cpp: a word already in the vocab is one token


def hf_name(gguf_name: str, cfg: ModelConfig) -> str | tuple[str, ...]:
  """The HF name of a GGUF tensor of a model of `cfg` (a tuple of one per expert for the
  experts' stacked tensors)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
  table = layer_tensors(cfg)
  if m and _LAYER_NAMES.get(m.group(2)) in table:
    suffix = table[_LAYER_NAMES[m.group(2)]][0]
    layer = int(m.group(1))
    if "{e}" in suffix:
      return tuple(layer_name(layer, suffix.format(e=e)) for e in range(cfg.n_experts))
    return layer_name(layer, suffix)
  raise KeyError(gguf_name)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF rows from llama.cpp's: per head, [r0, r_{H/2}, r1, r_{H/2+1}, ...] -> [r0..r_{H-1}].

  The inverse of convert_hf_to_gguf's `reshape(n, 2, H/2, D).swapaxes(1, 2)`: w[out, in]."""
  rows, cols = w.shape
  return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row order from HF's (what convert_hf_to_gguf writes)."""
  rows, cols = w.shape
  return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _reader_class():
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

  class Reader(GGUFReader):
    """GGUFReader that names the tensor when a file is truncated or holds an unknown type
    (the stock reader fails inside numpy with a bare reshape error)."""

    def _build_tensors(self, start_offs, fields):
      size = len(self.data)
      for field in fields:
        _, name, _, dims, raw_type, offset = field.parts
        name = bytes(name).decode("utf-8", errors="replace")
        try:
          qtype = GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
          raise ConversionError(f"tensor {name!r} has unknown GGML type id {int(raw_type[0])}"
                                ) from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        end = start_offs + int(offset[0]) + math.prod(int(d) for d in dims) * type_size // block
        if end > size:
          raise ConversionError(f"truncated: tensor {name!r} ends at byte {end}, but the file "
                                f"has {size} bytes")
      return super()._build_tensors(start_offs, fields)

  return Reader


def read_gguf(path: str):
  """A gguf.GGUFReader over `path`, with errors that name the file."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such GGUF file")
  try:
    return _reader_class()(path)
  except ConversionError as e:
    raise ConversionError(f"{path}: {e}") from None
  except Exception as e:  # the reader raises ValueError/IndexError/... on garbage
    raise ConversionError(f"{path}: not a readable GGUF file, corrupt or truncated "
                          f"({type(e).__name__}: {e})") from None


class _Fields:
  def __init__(self, reader, path):
    self.reader, self.path = reader, path

  def get(self, key, default=None):
    field = self.reader.fields.get(key)
    return default if field is None else field.contents()

  def need(self, key, scalar=True):
    value = self.get(key)
    if value is None:
      raise ConversionError(f"{self.path}: metadata key {key!r} is missing")
    if scalar and isinstance(value, list):
      raise ConversionError(f"{self.path}: metadata {key!r} is a per-layer list; only models "
                            "with the same value in every layer are supported")
    return value


def _f32(x) -> float:
  """The shortest decimal that round-trips a float32 (1e-05, not 9.999999747378752e-06)."""
  return float(str(np.float32(x)))


def _llama3_scaling(divisors: np.ndarray, cfg: dict, original_len: int, path: str) -> dict:
  """Llama-3.1 rope parameters from llama.cpp's per-frequency divisors (rope_freqs.weight).

  Divisors are 1 (kept), `factor` (long wavelengths) or, in between, 1/div = (1-s)/factor
  + s with s = orig/(wavelen*(high-low)) - low/(high-low): linear in 1/wavelen, so two
  middle points fix a = orig/(high-low) and b = low/(high-low); any orig then works."""
  h, theta = cfg["head_dim"], cfg["rope_theta"]
  divisors = divisors.astype(np.float64)
  factor = float(divisors.max())
  if factor <= 1 + 1e-6:
    return {}
  wavelen = 2 * math.pi * theta ** (np.arange(0, h, 2) / h)
  mid = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
  low, high = 1.0, 4.0  # Llama 3.1's values, kept when too few middle points to fit
  if mid.sum() >= 2:
    s = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
    a, neg_b = np.polyfit(1 / wavelen[mid], s, 1)
    low, high = -neg_b * original_len / a, (1 - neg_b) * original_len / a
  scaling = dict(rope_scaling_factor=_f32(factor), rope_low_freq_factor=_f32(low),
                 rope_high_freq_factor=_f32(high), rope_original_max_len=original_len)
  # Check the fit against the file with the model's own formula.
  from model.layers import rope_inv_freq
  ours = np.asarray(rope_inv_freq(ModelConfig(**cfg, **scaling)), np.float64)
  plain = 1 / (theta ** (np.arange(0, h, 2) / h))
  if not np.allclose(plain / ours, divisors, rtol=1e-3):
    raise ConversionError(f"{path}: tensor {_ROPE_FREQS!r} is not a Llama-3.1 rope scaling "
                          "(only that kind is supported)")
  return scaling


def _linear_scaling(fields, key, arch: str, spec: _Arch) -> dict:
  """Linear RoPE scaling as llama.cpp reads it: rope.scaling.factor (or the older
  rope.scale_linear) divides the positions unless rope.scaling.type (default "linear") says
  otherwise. Gemma 3's local layers keep their unscaled RoPE (llama.cpp's
  rope_freq_scale_train_swa = 1); Llama 3.1's scaling is the rope_freqs tensor, read apart."""
  scaling_type = fields.get(key("rope.scaling.type"), "linear")
  factor = fields.get(key("rope.scaling.factor"), fields.get(key("rope.scale_linear"), 0.0))
  if scaling_type == "none" or (scaling_type == "llama3" and arch == "llama"):
    return {}
  if scaling_type != "linear":
    raise ConversionError(f"{fields.path}: {key('rope.scaling.type')}={scaling_type!r} is not "
                          "supported (only none and linear; llama3 through rope_freqs)")
  if not factor or factor == 1.0:
    return {}
  if spec.swa_period and not spec.swa_theta:
    # llama.cpp would scale Gemma 2's local layers as well, which its rope_local_theta
    # here (from _gemma_fields) rules out: refused rather than guessed.
    raise ConversionError(f"{fields.path}: {key('rope.scaling.factor')}={factor} (linear RoPE "
                          f"scaling) is not supported for {arch!r}")
  return dict(rope_scaling_type="linear", rope_scaling_factor=_f32(factor))


def _gemma_fields(fields, key, spec: _Arch, cfg: dict) -> dict:
  """Gemma's window, local RoPE base, attention scale and soft-capping as llama.cpp reads
  them: its fixed period and local base (Gemma 3) unless the file says otherwise, the scale
  1/sqrt(head_dim) except for the 27B models' 1/sqrt(D/N) (query_pre_attn_scalar is not
  stored), Gemma 2's caps 50 and 30 unless stored."""
  out = {}
  window = int(fields.get(key("attention.sliding_window"), spec.swa_window))
  if window:
    out.update(sliding_window=window, global_every=spec.swa_period,
               rope_local_theta=_f32(fields.get(key("rope.freq_base_swa"),
                                                spec.swa_theta or cfg["rope_theta"])))
    pattern = fields.get(key("attention.sliding_window_pattern"))
    if isinstance(pattern, list):  # per layer: is it local?
      n = cfg["n_layers"]
      every = next((g for g in range(n + 1) if [bool(p) for p in pattern] ==
                    [not g or bool((i + 1) % g) for i in range(n)]), None)
      if every is None:
        raise ConversionError(f"{fields.path}: {key('attention.sliding_window_pattern')}="
                              f"{pattern} is not local layers with every n-th one global")
      out["global_every"] = every
    elif pattern is not None:
      out["global_every"] = int(pattern)
  d, n = cfg["d_model"], cfg["n_heads"]
  big = cfg["n_layers"] == spec.big_layers
  out["attn_scale"] = (d // n if big else cfg["head_dim"]) ** -0.5
  for name, field, default in zip(("attn_logit_softcapping", "final_logit_softcapping"),
                                  ("attn_softcap", "final_softcap"), spec.softcaps):
    value = fields.get(key(name), default)
    if value:
      out[field] = _f32(value)
  return out


def config_from_gguf(reader, path: str, **overrides) -> ModelConfig:
  """ModelConfig from GGUF metadata (`{arch}.*` keys) and which tensors exist."""
  fields = _Fields(reader, path)
  arch = fields.need("general.architecture")
  if arch not in _ARCHITECTURES:
    raise ConversionError(f"{path}: unsupported architecture {arch!r} (supported: "
                          f"{list(_ARCHITECTURES)})")
  spec = _ARCHITECTURES[arch]
  key = lambda k: f"{arch}.{k}"  # noqa: E731
  d, n = int(fields.need(key("embedding_length"))), int(fields.need(key("attention.head_count")))
  head_dim = int(fields.get(key("attention.key_length"), d // n))
  if int(fields.get(key("attention.value_length"), head_dim)) != head_dim:
    raise ConversionError(f"{path}: {key('attention.value_length')} differs from the key "
                          "length; not supported")
  if int(fields.get(key("rope.dimension_count"), head_dim)) != head_dim:
    raise ConversionError(f"{path}: {key('rope.dimension_count')} is not the head dim "
                          f"{head_dim}: partial rotary embeddings are not supported")
  scaling = _linear_scaling(fields, key, arch, spec)
  tensors = {t.name: t for t in reader.tensors}
  tokens = fields.get("tokenizer.ggml.tokens")
  vocab = fields.get(key("vocab_size"))
  if vocab is None:
    vocab = len(tokens) if tokens else int(tensors["token_embd.weight"].shape[1])
  n_experts = int(fields.get(key("expert_count"), 0))
  family = "MixtralForCausalLM" if arch == "llama" and n_experts else spec.family
  cfg = dict(vocab_size=int(vocab), d_model=d, n_layers=int(fields.need(key("block_count"))),
             n_heads=n, n_kv_heads=int(fields.get(key("attention.head_count_kv"), n)),
             head_dim=head_dim, max_seq_len=int(fields.get(key("context_length"), 2048)),
             rope_theta=_f32(fields.get(key("rope.freq_base"), 10000.0)),
             norm_eps=_f32(fields.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
             tie_embeddings="output.weight" not in tensors, **FAMILIES[family].options)
  if n_experts:
    used = int(fields.need(key("expert_used_count")))
    moe_d_ff = fields.get(key("expert_feed_forward_length"))
    d_ff = fields.get(key("feed_forward_length"))
    moe_d_ff = int(moe_d_ff or d_ff or 0)
    cfg.update(n_experts=n_experts, n_experts_per_token=used, moe_d_ff=moe_d_ff,
               d_ff=int(d_ff or moe_d_ff))
    if arch == "qwen3moe":  # llama.cpp renormalises the k weights whatever the file says
      cfg["norm_topk_prob"] = True
  else:
    cfg["d_ff"] = int(fields.need(key("feed_forward_length")))
  if spec.swa_period:
    cfg.update(_gemma_fields(fields, key, spec, cfg))
  cfg.update(scaling)
  if _ROPE_FREQS in tensors and scaling:
    raise ConversionError(f"{path}: both linear RoPE scaling and a {_ROPE_FREQS!r} tensor")
  if _ROPE_FREQS in tensors:
    from gguf.quants import dequantize
    t = tensors[_ROPE_FREQS]
    divisors = dequantize(t.data, t.tensor_type).reshape(-1)
    original = int(fields.get(key("rope.scaling.original_context_length"), 8192))
    cfg.update(_llama3_scaling(divisors, cfg, original, path))
  cfg.update(overrides)
  try:
    return ModelConfig(**cfg)
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from None


def tensors_from_gguf(reader, path: str, cfg: ModelConfig) -> ArraySource:
  """Every weight under its HF name, dequantized to float32 when first read (Q/K rows
  un-permuted, Gemma norms shifted back, experts split). Types and shapes are checked here,
  before anything is dequantized."""
  spec = _ARCHITECTURES[_Fields(reader, path).need("general.architecture")]
  expected = hf_shapes(cfg)
  arrays, where, shapes, parts = {}, {}, {}, {}
  for t in reader.tensors:
    if t.name == _ROPE_FREQS:
      continue  # read into the config
    try:
      name = hf_name(t.name, cfg)
    except KeyError:
      raise ConversionError(f"{path}: tensor {t.name!r} is not part of this model (a "
                            f"{spec.family.removesuffix('ForCausalLM')} with n_experts="
                            f"{cfg.n_experts})") from None
    names = (name,) if isinstance(name, str) else name
    site = f"{path} (GGUF tensor {t.name!r})"
    if t.tensor_type.name not in _SUPPORTED_TYPES:
      raise ConversionError(f"{site}: type {t.tensor_type.name} is not supported "
                            f"(supported: {', '.join(_SUPPORTED_TYPES)})")
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml lists dims inner first
    want = expected.get(names[0])
    if want is not None and isinstance(name, tuple):
      want = (len(names),) + want
    if want is not None and shape != want:
      raise ConversionError(
          f"{site}: shape {shape} does not match the metadata (d_model={cfg.d_model}, "
          f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, "
          f"d_ff={cfg.d_ff}, vocab_size={cfg.vocab_size}, n_experts={cfg.n_experts}), "
          f"which needs {want}")
    heads = None
    if spec.permute_qk:
      heads = (cfg.n_heads if t.name.endswith("attn_q.weight") else
               cfg.n_kv_heads if t.name.endswith("attn_k.weight") else None)
    shift = spec.norm_shift if t.name.endswith("norm.weight") else 0.0
    make = lambda t=t, shape=shape, heads=heads, shift=shift: _dequantize(t, shape, heads, shift)
    if isinstance(name, str):
      arrays[name], shapes[name], where[name] = make, shape, site
    else:  # the experts' stacked tensor, made once for all of them
      arrays[t.name] = make
      for e, part in enumerate(names):
        parts[part], shapes[part], where[part] = (t.name, e), shape[1:], site
  return ArraySource(arrays, path, where, shapes, parts)


def _dequantize(tensor, shape, heads, shift=0.0):
  from gguf.quants import dequantize
  w = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
  if shift:
    w = w - np.float32(shift)
  return w if heads is None else unpermute_qk(w, heads)


def _pre_tokenizer(pre: str, path: str):
  from tokenizers import Regex, pre_tokenizers
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _GPT2:
    return byte_level
  if pre in _GPT2_DIGITS:  # llama.cpp: split "\p{N}" first, then the GPT-2 regex
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _SPLIT_REGEX:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise ConversionError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (supported: "
                        f"{sorted(_GPT2 + _GPT2_DIGITS + tuple(_SPLIT_REGEX))})")


def bpe_tokenizer(tokens: list[str], token_types: list[int] | None, merges: list[str],
                  pre: str = "default", path: str = "(tokenizer)"):
  """A byte-level BPE tokenizers.Tokenizer from llama.cpp's vocabulary description:
  tokens in GPT-2's byte-to-unicode spelling, llama.cpp token types, "a b" merges in rank
  order and the `tokenizer.ggml.pre` name that picks the pre-tokenizer."""
  from tokenizers import Tokenizer, decoders, models, processors
  token_types = token_types or [_NORMAL] * len(tokens)
  vocab = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)  # a few GGUFs repeat padding tokens: the first id wins
  bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                   ignore_merges=pre in _IGNORE_MERGES)
  tokenizer = Tokenizer(bpe)
  tokenizer.pre_tokenizer = _pre_tokenizer(pre, path)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  return _add_special_tokens(tokenizer, tokens, token_types, vocab, path)


def spm_tokenizer(tokens: list[str], scores: list[float], token_types: list[int] | None,
                  add_space_prefix: bool = True, path: str = "(tokenizer)",
                  merge_order: str = "score"):
  """A tokenizers.Tokenizer that encodes as llama.cpp's SentencePiece ("llama") tokenizer:
  spaces become "▁" and one more is put before the text (add_space_prefix); then, over the
  whole text, the adjacent pair whose concatenation is the best-scoring token is merged until
  no pair is a token; a character left outside the vocabulary becomes the <0xXX> tokens of
  its UTF-8 bytes. That is BPE (with byte fallback) whose merges are every way of cutting a
  token in two, ranked by the token's score (merge_order="score") or, for vocabularies whose
  scores are not their merge order (Gemma's), by the token's place in the file ("position",
  the longer left piece first among one token's cuts, as transformers' GGUF loader ranks
  them). Only tokens text can spell are merged into: not control, unknown or byte tokens."""
  from tokenizers import Tokenizer, decoders, models, normalizers
  token_types = token_types or [_NORMAL] * len(tokens)
  vocab = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)
  rank = {"score": lambda i, cut: (-scores[i], i, cut), "position": lambda i, cut: (i, -cut)}
  ranked = sorted((rank[merge_order](i, cut), i, cut) for token, i in vocab.items()
                  if token_types[i] in _MERGEABLE
                  for cut in range(1, len(token))
                  if token[:cut] in vocab and token[cut:] in vocab)
  merges = [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]
  unknown = next((t for t, k in zip(tokens, token_types) if k == _UNKNOWN), None)
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unknown,
                                   byte_fallback=True, fuse_unk=True))
  # llama.cpp prepends the space to every piece of text, after each special token too: a
  # normalizer does that (a Metaspace pre-tokenizer would not before text that starts with one).
  replace = normalizers.Replace(" ", _SPACE)
  tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend(_SPACE), replace])
                          if add_space_prefix else replace)
  steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  if add_space_prefix:  # the space put in front is no text
    steps.append(decoders.Strip(" ", 1, 0))
  tokenizer.decoder = decoders.Sequence(steps)
  return _add_special_tokens(tokenizer, tokens, token_types, vocab, path)


def _gemma_vocab(tokens: list[str], token_types: list[int] | None, add_space_prefix,
                 path: str) -> tuple[list[str], list[int] | None]:
  """Gemma's vocabulary as its own tokenizer (and transformers' GGUF loader) reads it.
  convert_hf_to_gguf.py stores Gemma's runs of spaces ("▁▁", ...) as user-defined tokens of
  real spaces, for llama.cpp to match in the raw text; Gemma's tokenizer merges them from
  "▁"s like any other text, so they are spelled back and made normal tokens. Gemma puts no
  space in front of the text (its files say add_space_prefix = false); a file that asks for
  one is refused: transformers' loader would ignore the key and llama.cpp follow it."""
  if add_space_prefix:
    raise ConversionError(f"{path}: tokenizer.ggml.add_space_prefix=true with a Gemma "
                          "vocabulary (general.architecture gemma*) is not supported: Gemma's "
                          "tokenizer puts no space in front of the text")
  token_types = list(token_types or [_NORMAL] * len(tokens))
  tokens = list(tokens)
  for i, token in enumerate(tokens):
    if " " in token and not token.strip():
      tokens[i], token_types[i] = _SPACE * len(token), _NORMAL
  return tokens, token_types


def _add_special_tokens(tokenizer, tokens, token_types, vocab, path):
  """Control (and unknown) tokens are matched in text before the model, as llama.cpp does with
  parse_special; user-defined tokens too, but they decode like text."""
  from tokenizers import AddedToken
  special = [i for i, t in enumerate(token_types) if t in (_CONTROL, _UNKNOWN)]
  user = [i for i, t in enumerate(token_types) if t == _USER_DEFINED]
  tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in special])
  tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
  for i in special + user:
    if tokenizer.token_to_id(tokens[i]) != i and vocab[tokens[i]] == i:
      raise ConversionError(f"{path}: special token {tokens[i]!r} did not keep id {i}")
  return tokenizer


def tokenizer_from_gguf(reader, path: str, max_len: int | None = None):
  """(tokenizers.Tokenizer, HF tokenizer_config dict) rebuilt from the GGUF vocab."""
  from tokenizers import processors
  fields = _Fields(reader, path)
  kind = fields.get("tokenizer.ggml.model")
  if kind not in _TOKENIZER_MODELS:
    raise ConversionError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (supported: "
                          "'gpt2', byte-level BPE; 'llama', SentencePiece)")
  tokens = fields.need("tokenizer.ggml.tokens", scalar=False)
  types = fields.get("tokenizer.ggml.token_type")
  if kind == "gpt2":
    tokenizer = bpe_tokenizer(tokens, types, fields.get("tokenizer.ggml.merges") or [],
                              fields.get("tokenizer.ggml.pre", "default"), path)
  else:
    scores = fields.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
      raise ConversionError(f"{path}: tokenizer.ggml.model='llama' (SentencePiece) needs "
                            f"'tokenizer.ggml.scores', one per token ({len(tokens)}); found "
                            f"{'none' if scores is None else len(scores)}")
    prefix, order = bool(fields.get("tokenizer.ggml.add_space_prefix", True)), "score"
    if fields.get("general.architecture") in _GEMMA_VOCABS:
      tokens, types = _gemma_vocab(tokens, types,
                                   fields.get("tokenizer.ggml.add_space_prefix"), path)
      prefix, order = False, "position"
    tokenizer = spm_tokenizer(tokens, scores, types, prefix, path, order)

  ids = {k: fields.get(f"tokenizer.ggml.{k}_token_id")
         for k in ("bos", "eos", "unknown", "padding")}
  # llama.cpp's defaults when the file does not say: a SentencePiece vocabulary adds BOS.
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            "add_eos_token": bool(fields.get("tokenizer.ggml.add_eos_token", False))}
  for key, hf_key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
    if ids[key] is not None and 0 <= int(ids[key]) < len(tokens):
      config[hf_key] = tokens[int(ids[key])]
  if max_len:
    config["model_max_length"] = max_len
  template = fields.get("tokenizer.chat_template")
  if template:
    config["chat_template"] = template

  post = [tokenizer.post_processor] if tokenizer.post_processor else []
  bos = [config["bos_token"]] if config["add_bos_token"] and "bos_token" in config else []
  eos = [config["eos_token"]] if config["add_eos_token"] and "eos_token" in config else []
  if bos or eos:  # what llama.cpp's add_bos/add_eos do, as an HF post-processor
    seq = lambda x, i: " ".join([f"{t}:{i}" for t in bos] + [f"${x}:{i}"]  # noqa: E731
                                + [f"{t}:{i}" for t in eos])
    post.append(processors.TemplateProcessing(
        single=seq("A", 0), pair=f"{seq('A', 0)} {seq('B', 1)}",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(bos + eos)]))
  if post:
    tokenizer.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
  return tokenizer, config


def load_gguf(path: str, mesh=None, **config_overrides):
  """(cfg, params, tokenizer, extra) from a GGUF file of any architecture in _ARCHITECTURES.

  params: our float32 (cfg.param_dtype) parameter pytree placed on `mesh` (default: the
  first device). extra: chat_template, bos/eos/pad_token_id, eos_token_ids and the HF
  tokenizer_config dict. `config_overrides` are ModelConfig fields (scan_layers, ...)."""
  reader = read_gguf(path)
  cfg = config_from_gguf(reader, path, **config_overrides)
  # The tokenizer first: an unsupported one (e.g. a T5 vocabulary) fails before the weights
  # are read.
  tokenizer, tokenizer_config = tokenizer_from_gguf(reader, path, cfg.max_seq_len)
  source = tensors_from_gguf(reader, path, cfg)
  params = params_from_source(cfg, source, mesh)
  fields = _Fields(reader, path)
  ids = {f"{k}_token_id": fields.get(f"tokenizer.ggml.{g}_token_id")
         for k, g in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
  ids = {k: None if v is None else int(v) for k, v in ids.items()}
  extra = dict(ids, eos_token_ids=(ids["eos_token_id"],) if ids["eos_token_id"] is not None
               else (), chat_template=tokenizer_config.get("chat_template"),
               tokenizer_config=tokenizer_config)
  return cfg, params, tokenizer, extra
