"""GGUF export: a model of ours as a llama.cpp GGUF file, infer/gguf.py's import read backwards.

    save_gguf("out.gguf", cfg, params, tokenizer, tokenizer_config, gguf_type="q8_0")

The architecture is the one llama.cpp runs the model as: the HF family infer/hf_config.py's
architecture_of finds, as llama (Llama, SmolLM2, Mistral without a sliding window, Mixtral),
qwen2, qwen3, qwen3moe, gemma2 or gemma3. Tensors get infer/gguf.py's names, with what
llama.cpp's convert_hf_to_gguf.py does to them:
  * llama: Q and K rows in llama.cpp's order for its pairwise RoPE (infer/gguf.py permute_qk);
  * Gemma: each norm stored as 1 + w;
  * experts stacked into one [E, ...] tensor per layer and weight;
  * Llama 3.1 RoPE scaling as the per-frequency divisors `rope_freqs.weight`;
  * tied embeddings: no output.weight (llama.cpp then reads token_embd).

Types (`gguf_type`: what gguf-py's quantizers write): f32, f16, bf16, q8_0, q4_0, q4_1, q5_0,
q5_1. As llama.cpp's tools do, 1-D tensors (norms, biases) and the MoE router stay F32, and a
matrix whose rows are not a multiple of the type's block is written F16; like llama-quantize,
the 4- and 5-bit types keep the output matrix (output.weight, or token_embd when tied) at
higher precision, Q8_0. gguf-py has no quantizer for the K-quants (Q4_K, ...): write f16 and
run llama.cpp's llama-quantize for those.

The tokenizer (infer/gguf_vocab.py): byte-level BPE as tokenizer.ggml.model "gpt2" (SmolLM2,
Llama 3, Qwen, ours), SentencePiece-style BPE with byte fallback as "llama" (Llama 2, Mistral,
Gemma), with the bos/eos ids, add_bos/add_eos and the chat template.

The file is written beside the destination one tensor at a time (the host holds one tensor),
read back with infer/gguf.py, and renamed into place only if the model its metadata describes,
as llama.cpp reads it, is this one: an option llama.cpp's architecture lacks (Mistral's
sliding window, a Gemma 2 without soft-capping, ...) is an error naming it, and no file appears.
"""

import dataclasses
import math

import numpy as np

from infer.files import ConversionError, atomic_file
# The importer's tables, read in reverse: one source of truth for names and conventions.
from infer.gguf import (_ARCHITECTURES, _GLOBAL_NAMES, _LAYER_NAMES, _ROPE_FREQS,
                        config_from_gguf, hf_name, permute_qk, read_gguf, tokenizer_from_gguf)
from infer.gguf_vocab import add_vocab, gguf_vocab
from infer.hf import ParamsSource, hf_shapes
from infer.hf_config import architecture_of, canonical
from model import ModelConfig

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")  # whose output matrix stays Q8_0
_GGUF_ARCH = {  # HF family (infer/hf_config.py FAMILIES) -> llama.cpp architecture
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
_ROUTER = "ffn_gate_inp.weight"


def ggml_type(gguf_type: str):
  """The GGMLQuantizationType of a --gguf_type value."""
  from gguf import GGMLQuantizationType
  if gguf_type not in GGUF_TYPES:
    raise ValueError(f"--gguf_type={gguf_type!r}: not one of {list(GGUF_TYPES)} (the types "
                     "gguf-py can write; for K-quants run llama.cpp's llama-quantize on an f16 "
                     "export)")
  return GGMLQuantizationType[gguf_type.upper()]


def gguf_architecture(cfg: ModelConfig) -> str:
  return _GGUF_ARCH[architecture_of(cfg)]


# ---------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tensor:
  """One GGUF tensor: its name, the HF-named tensors it is made of (one per expert when
  stacked), its shape (outer dimension first), and what convert_hf_to_gguf does to it."""
  name: str
  sources: tuple[str, ...]
  shape: tuple[int, ...]
  stacked: bool = False
  qk_heads: int = 0  # > 0: rows permuted into llama.cpp's order over this many heads
  shift: float = 0.0  # added (Gemma's norms: 1 + w)


def tensor_plan(cfg: ModelConfig, arch: str) -> list[Tensor]:
  """The model's GGUF tensors in llama.cpp's order (embedding, blocks, final norm, head)."""
  spec, shapes = _ARCHITECTURES[arch], hf_shapes(cfg)
  first, *last = _GLOBAL_NAMES
  names = [first] + [f"blk.{i}.{s}" for i in range(cfg.n_layers) for s in _LAYER_NAMES] + last
  plan = []
  for name in names:
    try:
      sources = hf_name(name, cfg)
    except KeyError:
      continue  # a tensor this family does not have
    stacked = isinstance(sources, tuple)
    sources = sources if stacked else (sources,)
    if sources[0] not in shapes:  # output.weight of tied embeddings
      continue
    shape = ((len(sources),) if stacked else ()) + shapes[sources[0]]
    heads = 0
    if spec.permute_qk:
      heads = (cfg.n_heads if name.endswith("attn_q.weight") else
               cfg.n_kv_heads if name.endswith("attn_k.weight") else 0)
    shift = spec.norm_shift if name.endswith("norm.weight") else 0.0
    plan.append(Tensor(name, sources, shape, stacked, heads, shift))
  return plan


def tensor_type(tensor: Tensor, gguf_type: str, tied: bool):
  """(GGMLQuantizationType, why it is not the requested type or None) of one tensor."""
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
  if len(tensor.shape) == 1 or tensor.name.endswith(_ROUTER):
    return Q.F32, None
  qtype = ggml_type(gguf_type)
  output = "token_embd.weight" if tied else "output.weight"
  if tensor.name == output and gguf_type in _LOW_BIT:
    return Q.Q8_0, f"the output matrix of {gguf_type} stays Q8_0, as llama-quantize keeps it"
  block = GGML_QUANT_SIZES[qtype][0]
  if tensor.shape[-1] % block:
    return Q.F16, (f"rows of {tensor.shape[-1]} values are not a multiple of {qtype.name}'s "
                   f"block of {block}")
  return qtype, None


def _nbytes(shape, qtype) -> int:
  from gguf import GGML_QUANT_SIZES
  block, size = GGML_QUANT_SIZES[qtype]
  return math.prod(shape) // block * size


def tensor_data(source: ParamsSource, tensor: Tensor) -> np.ndarray:
  """float32 array of `tensor` in GGUF's layout (outer dimension first)."""
  parts = [source.read(name, ()) for name in tensor.sources]
  w = np.stack(parts) if tensor.stacked else parts[0]
  if tensor.qk_heads:
    w = permute_qk(w, tensor.qk_heads)
  if tensor.shift:
    w = w + np.float32(tensor.shift)
  return np.ascontiguousarray(w, np.float32)


def rope_divisors(cfg: ModelConfig) -> np.ndarray:
  """float32[H/2]: Llama 3.1 scaling as convert_hf_to_gguf stores it (rope_freqs.weight),
  each frequency's divisor: the unscaled inverse frequency over the scaled one."""
  from model.layers import rope_inv_freq
  h = cfg.head_dim
  plain = 1.0 / cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
  return (plain / np.asarray(rope_inv_freq(cfg), np.float64)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Metadata and the whole file
# ---------------------------------------------------------------------------------------

def _add_config(writer, cfg: ModelConfig, arch: str) -> None:
  """{arch}.* keys as convert_hf_to_gguf writes them for this architecture."""
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.n_layers)
  experts_d_ff = cfg.moe_d_ff or cfg.d_ff
  # llama's (Mixtral's) feed_forward_length is each expert's width; qwen3moe has its own key.
  writer.add_feed_forward_length(experts_d_ff if cfg.n_experts and arch == "llama"
                                 else cfg.d_ff)
  writer.add_head_count(cfg.n_heads)
  writer.add_head_count_kv(cfg.n_kv_heads)
  # Gemma's always (as convert_hf_to_gguf writes them): transformers' GGUF loader takes the
  # head size from the key, and Gemma's default otherwise.
  if cfg.head_dim != cfg.d_model // cfg.n_heads or _ARCHITECTURES[arch].swa_period:
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
  writer.add_rope_dimension_count(cfg.head_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  if cfg.rope_scaling_factor > 0 and cfg.rope_scaling_type == "linear":
    from gguf import RopeScalingType
    writer.add_rope_scaling_type(RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
  elif cfg.rope_scaling_factor > 0:  # llama3: the divisors are the rope_freqs tensor
    writer.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_len)
  if cfg.n_experts:
    writer.add_expert_count(cfg.n_experts)
    writer.add_expert_used_count(cfg.n_experts_per_token)
    if arch != "llama":
      writer.add_expert_feed_forward_length(experts_d_ff)
  if _ARCHITECTURES[arch].swa_period:  # Gemma
    if cfg.sliding_window:
      writer.add_sliding_window(cfg.sliding_window)
    if cfg.attn_softcap:
      writer.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.final_softcap:
      writer.add_final_logit_softcapping(cfg.final_softcap)


def _same(a, b) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
  return a == b


def check_reads_back(path: str, cfg: ModelConfig, arch: str) -> None:
  """The file's metadata, as llama.cpp reads it (infer/gguf.py), describes `cfg`'s model, and
  its tokenizer reads back."""
  reader = read_gguf(path)
  tokenizer_from_gguf(reader, path)
  back = canonical(config_from_gguf(reader, path))
  want = canonical(cfg)
  diff = [f"{f.name}={getattr(want, f.name)!r} (llama.cpp: {getattr(back, f.name)!r})"
          for f in dataclasses.fields(want)
          if not _same(getattr(want, f.name), getattr(back, f.name))]
  if diff:
    raise ConversionError(f"llama.cpp's {arch!r} architecture would run another model than "
                          f"this one: {', '.join(diff)}; no GGUF written")


def save_gguf(path: str, cfg: ModelConfig, params, tokenizer, tokenizer_config: dict | None,
              *, gguf_type: str = "f16", name: str = "", overwrite: bool = False,
              log=None) -> str:
  """Writes the model (params on any mesh, dense) as one GGUF file at `path`, all or
  nothing; returns the path. `log(message)` hears of each tensor not of `gguf_type`."""
  from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType
  from gguf.quants import quantize
  ggml_type(gguf_type)  # a bad type fails first
  arch = gguf_architecture(cfg)
  vocab = gguf_vocab(tokenizer, tokenizer_config or {}, cfg.vocab_size, arch)
  plan = tensor_plan(cfg, arch)
  types = {}
  for t in plan:
    types[t.name], why = tensor_type(t, gguf_type, cfg.tie_embeddings)
    if why and log is not None:
      log(f"{t.name}: {types[t.name].name} ({why})")
  divisors = rope_divisors(cfg) if (arch == "llama" and cfg.rope_scaling_factor > 0
                                    and cfg.rope_scaling_type == "llama3") else None
  source = ParamsSource(cfg, params)
  with atomic_file(path, overwrite) as tmp:
    writer = GGUFWriter(tmp, arch)
    try:
      if name:
        writer.add_name(name)
      writer.add_file_type(LlamaFileType[("ALL_" if gguf_type == "f32" else "MOSTLY_")
                                         + gguf_type.upper()])
      writer.add_quantization_version(GGML_QUANT_VERSION)
      _add_config(writer, cfg, arch)
      add_vocab(writer, vocab)
      if divisors is not None:
        writer.add_tensor_info(_ROPE_FREQS, divisors.shape, np.float32, divisors.nbytes)
      for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.float32, _nbytes(t.shape, types[t.name]),
                               raw_dtype=types[t.name])
      writer.write_header_to_file()
      writer.write_kv_data_to_file()
      writer.write_ti_data_to_file()
      if divisors is not None:
        writer.write_tensor_data(divisors)
      for t in plan:  # one tensor on the host at a time
        writer.write_tensor_data(quantize(tensor_data(source, t), types[t.name]))
    finally:
      writer.close()
      source.close()
    check_reads_back(tmp, cfg, arch)
  return path
