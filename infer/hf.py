"""Hugging Face Llama checkpoints (config.json + safetensors) to and from our parameters.

An HF Llama stores each weight as `W[out, in]` (`y = x @ W.T`); we store the einsum layout
(`q: [D, N, H]`, `o: [N, H, D]`, `gate: [D, F]`, ...), stacked on a leading L axis when the
layers are scanned. Both use the same half-split RoPE, so q/k need no permutation here (GGUF
does: see infer/gguf.py, which reads through this file's mapping).

Import builds each parameter with `jax.make_array_from_callback` straight into the target
mesh's shardings: every device asks for its block, read from the memory-mapped safetensors
(only the rows and columns it needs, one layer at a time). Export walks the parameters
tensor by tensor (one layer of a stacked array at a time, `jax.device_get` per tensor) and
writes size-capped safetensors shards. Neither ever holds the whole model on the host.
"""

import dataclasses
import json
import os
import re
import struct
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from infer.files import (ConversionError, atomic_directory, parse_size, read_tokenizer_files,
                         token_ids, write_tokenizer_files)
from model import ModelConfig

CONFIG, INDEX, SINGLE = "config.json", "model.safetensors.index.json", "model.safetensors"
_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------
# Names and layouts
# ---------------------------------------------------------------------------------------

# How our per-layer array A relates to the HF matrix W:
#   same       A = W                              (norm scales, the embedding [V, D])
#   t          A = W.T                            (mlp [D, F] / [F, D], lm_head [D, V])
#   heads_in   A[D, X, H] = W.T.reshape(D, X, H)  (q, k, v: W is [X*H, D])
#   heads_out  A[N, H, D] = W.T.reshape(N, H, D)  (o: W is [D, N*H])
_LAYER = {
    ("attn", "q"): ("self_attn.q_proj.weight", "heads_in"),
    ("attn", "k"): ("self_attn.k_proj.weight", "heads_in"),
    ("attn", "v"): ("self_attn.v_proj.weight", "heads_in"),
    ("attn", "o"): ("self_attn.o_proj.weight", "heads_out"),
    ("mlp", "gate"): ("mlp.gate_proj.weight", "t"),
    ("mlp", "up"): ("mlp.up_proj.weight", "t"),
    ("mlp", "down"): ("mlp.down_proj.weight", "t"),
    ("attn_norm", "scale"): ("input_layernorm.weight", "same"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "same"),
}
_GLOBAL = {
    ("embedding",): ("model.embed_tokens.weight", "same"),
    ("final_norm", "scale"): ("model.norm.weight", "same"),
    ("lm_head",): ("lm_head.weight", "t"),
}
# Buffers some checkpoints carry that hold nothing a Llama needs.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def layer_name(layer: int, suffix: str) -> str:
  return f"model.layers.{layer}.{suffix}"


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor a Llama of `cfg` has, in HF's order, with its [out, in] shape."""
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  per_layer = {
      "self_attn.q_proj.weight": (n * h, d), "self_attn.k_proj.weight": (k * h, d),
      "self_attn.v_proj.weight": (k * h, d), "self_attn.o_proj.weight": (d, n * h),
      "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
      "mlp.down_proj.weight": (d, f), "input_layernorm.weight": (d,),
      "post_attention_layernorm.weight": (d,),
  }
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
  for layer in range(cfg.n_layers):
    shapes.update({layer_name(layer, s): shape for s, shape in per_layer.items()})
  shapes["model.norm.weight"] = (d,)
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
  return shapes


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """Where one of our parameters lives in HF: names (one per layer if stacked) and layout."""
  names: tuple[str, ...]
  kind: str
  stacked: bool


def _leaf(path: tuple[str, ...], cfg: ModelConfig) -> _Leaf:
  if path in _GLOBAL:
    name, kind = _GLOBAL[path]
    return _Leaf((name,), kind, False)
  head, rest = path[0], tuple(path[1:])
  if rest in _LAYER:
    suffix, kind = _LAYER[rest]
    if head == "layers":
      return _Leaf(tuple(layer_name(i, suffix) for i in range(cfg.n_layers)), kind, True)
    if m := re.fullmatch(r"layers_(\d+)", head):
      return _Leaf((layer_name(int(m.group(1)), suffix),), kind, False)
  raise ConversionError(f"parameter {'/'.join(path)} has no Hugging Face Llama counterpart")


def _to_hf(a: np.ndarray, kind: str) -> np.ndarray:
  if kind == "same":
    return a
  if kind == "t":
    return a.T
  if kind == "heads_in":  # [D, X, H] -> [X*H, D]
    return a.reshape(a.shape[0], -1).T
  if kind == "heads_out":  # [N, H, D] -> [D, N*H]
    return a.reshape(-1, a.shape[-1]).T
  raise AssertionError(kind)


def _read_ours(source, name: str, kind: str, cfg: ModelConfig, index: tuple[slice, ...]):
  """Our per-layer array's block `index`, reading only the rows/columns of W it needs."""
  h = cfg.head_dim
  if kind == "same":
    return source.read(name, index)
  if kind == "t":
    return source.read(name, (index[1], index[0])).T
  if kind == "heads_in":  # A[d, x, j] = W[x*H + j, d]
    sd, sx, sh = index
    w = source.read(name, (slice(sx.start * h, sx.stop * h), sd))
    return w.T.reshape(w.shape[1], -1, h)[:, :, sh]
  if kind == "heads_out":  # A[n, j, d] = W[d, n*H + j]
    sn, sh, sd = index
    w = source.read(name, (sd, slice(sn.start * h, sn.stop * h)))
    return w.T.reshape(-1, h, w.shape[0])[:, sh, :]
  raise AssertionError(kind)


# ---------------------------------------------------------------------------------------
# Tensor sources: safetensors directories and in-memory dicts (GGUF)
# ---------------------------------------------------------------------------------------

class ArraySource:
  """HF-named tensors held in memory, or made on demand by a callable (infer/gguf.py
  dequantizes that way). Made tensors are kept until `release()`, which
  params_from_source calls after each parameter: the host holds one parameter's tensors."""

  def __init__(self, arrays: dict, path: str, where: dict[str, str] | None = None,
               shapes: dict[str, tuple[int, ...]] | None = None):
    self.arrays, self.path, self._where = arrays, path, where or {}
    self._shapes, self._made = shapes or {}, {}

  def names(self):
    return list(self.arrays)

  def shape(self, name):
    if name in self._shapes:
      return tuple(self._shapes[name])
    return tuple(self._tensor(name).shape)

  def where(self, name) -> str:
    return self._where.get(name, self.path)

  def _tensor(self, name):
    value = self.arrays[name]
    if not callable(value):
      return value
    if name not in self._made:
      self._made[name] = value()
    return self._made[name]

  def read(self, name, index):
    return np.asarray(self._tensor(name)[tuple(index)], np.float32)

  def release(self):
    self._made.clear()

  def close(self):
    self.release()


def _check_safetensors(path: str) -> list[str]:
  """The tensor names in a safetensors file, after checking its header against its size,
  so a truncated file names the first tensor it cut off."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: not a safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise ConversionError(f"{path}: corrupt or truncated safetensors file: header of {n} "
                            f"bytes in a {size}-byte file")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
  names = [k for k in header if k != "__metadata__"]
  for name in names:
    end = 8 + n + header[name]["data_offsets"][1]
    if end > size:
      raise ConversionError(f"{path}: truncated: tensor {name!r} ends at byte {end}, but the "
                            f"file has {size} bytes")
  return names


class SafetensorsSource:
  """The tensors of an HF checkpoint directory, read lazily slice by slice (memory-mapped)."""

  def __init__(self, directory: str):
    from safetensors import SafetensorError, safe_open
    self.path = directory
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise ConversionError(f"{index}: not a safetensors index ({e!r})") from None
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, SINGLE)):
      files = [SINGLE]
    else:
      found = sorted(os.listdir(directory))
      raise ConversionError(f"{directory}: no {SINGLE} or {INDEX} (found {found}); only "
                            "safetensors checkpoints are supported")
    self._files, self._where = {}, {}
    for file in files:
      path = os.path.join(directory, file)
      if not os.path.isfile(path):
        raise ConversionError(f"{index}: lists {file}, which does not exist")
      names = _check_safetensors(path)
      try:
        self._files[file] = safe_open(path, framework="numpy")
      except SafetensorError as e:
        raise ConversionError(f"{path}: unreadable safetensors file ({e})") from None
      for name in names:
        self._where[name] = path
    if os.path.isfile(index):
      for name, file in weight_map.items():
        if self._where.get(name) != os.path.join(directory, file):
          raise ConversionError(f"{index}: maps {name!r} to {file}, which does not hold it")

  def names(self):
    return list(self._where)

  def _slice(self, name):
    return self._files[os.path.basename(self._where[name])].get_slice(name)

  def shape(self, name):
    return tuple(self._slice(name).get_shape())

  def where(self, name) -> str:
    return self._where[name]

  def read(self, name, index):
    return np.asarray(self._slice(name)[tuple(index)], np.float32)

  def close(self):
    self._files.clear()


class ParamsSource:
  """Our own parameters seen as HF-named tensors, one layer at a time: lets any layout be
  rebuilt into another (scanned <-> unrolled layers, another mesh) by params_from_source."""

  def __init__(self, cfg: ModelConfig, params, path: str = "(parameters)"):
    self.cfg, self.path, self._by_name = cfg, path, {}
    for key, value in traverse_util.flatten_dict(params).items():
      leaf = _leaf(key, cfg)
      for layer, name in enumerate(leaf.names):
        self._by_name[name] = (value, layer if leaf.stacked else None, leaf.kind)
    self._last = (None, None)

  def names(self):
    return list(self._by_name)

  def where(self, name):
    return self.path

  def _tensor(self, name):
    if self._last[0] != name:  # consecutive reads of one tensor are the norm
      value, layer, kind = self._by_name[name]
      arr = np.asarray(jax.device_get(value if layer is None else value[layer]), np.float32)
      self._last = (name, _to_hf(arr, kind))
    return self._last[1]

  def shape(self, name):
    value, layer, kind = self._by_name[name]
    shape = value.shape[1:] if layer is not None else value.shape
    return _to_hf(np.empty(shape, np.uint8), kind).shape

  def read(self, name, index):
    return self._tensor(name)[tuple(index)]

  def close(self):
    self._last = (None, None)


def check_tensors(cfg: ModelConfig, source) -> None:
  """Every tensor the config needs is there with the right shape, and nothing unknown is."""
  expected = hf_shapes(cfg)
  names = set(source.names())
  dims = (f"vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, n_heads={cfg.n_heads}, "
          f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, d_ff={cfg.d_ff}")
  for name, shape in expected.items():
    if name not in names:
      raise ConversionError(f"{source.path}: tensor {name!r} is missing (model.n_layers="
                            f"{cfg.n_layers}, tie_embeddings={cfg.tie_embeddings})")
    got = source.shape(name)
    if got != shape:
      raise ConversionError(f"{source.where(name)}: tensor {name!r} has shape {got}, but the "
                            f"config ({dims}) needs {shape}")
  unknown = sorted(n for n in names - set(expected)
                   if not _IGNORED.fullmatch(n) and not (n == "lm_head.weight"
                                                         and cfg.tie_embeddings))
  if unknown:
    raise ConversionError(f"{source.where(unknown[0])}: tensors a Llama of this config does not "
                          f"have: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")


def _norm(index, shape) -> tuple[slice, ...]:
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*s.indices(dim)) for s, dim in zip(index, shape))


def params_from_source(cfg: ModelConfig, source, mesh=None):
  """Our parameter pytree, each leaf built in place on `mesh` (default: the first device)
  from the HF-named tensors of `source`, cast to cfg.param_dtype."""
  from infer.workdir import abstract_params  # deferred: keeps this module light to import
  check_tensors(cfg, source)
  abstract, shardings = abstract_params(cfg, mesh)
  flat_abstract = traverse_util.flatten_dict(abstract)
  flat_shardings = traverse_util.flatten_dict(shardings)
  out = {}
  for path, spec in flat_abstract.items():
    leaf = _leaf(path, cfg)
    cache = {}  # replicated devices ask for the same block: read it once

    def block(index, leaf=leaf, spec=spec, cache=cache):
      index = _norm(index, spec.shape)
      key = tuple((s.start, s.stop) for s in index)
      if key not in cache:
        if leaf.stacked:
          layers = range(index[0].start, index[0].stop)
          arr = np.stack([_read_ours(source, leaf.names[i], leaf.kind, cfg, index[1:])
                          for i in layers])
        else:
          arr = _read_ours(source, leaf.names[0], leaf.kind, cfg, index)
        cache[key] = np.ascontiguousarray(arr.astype(spec.dtype))
      return cache[key]

    out[path] = jax.make_array_from_callback(spec.shape, flat_shardings[path], block)
    if hasattr(source, "release"):
      source.release()
  return traverse_util.unflatten_dict(out)


def hf_tensors(cfg: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 host array) one tensor at a time, in HF's order. Each stacked
  parameter is sliced one layer at a time on its devices before `device_get`, so the host
  holds one tensor, never the model."""
  source = ParamsSource(cfg, params)
  check_tensors(cfg, source)
  for name in hf_shapes(cfg):
    yield name, np.ascontiguousarray(source._tensor(name))
  source.close()


def relayout(cfg: ModelConfig, params, new_cfg: ModelConfig, mesh=None):
  """`params` of `cfg` rebuilt for `new_cfg` (same shapes; e.g. scan_layers or
  param_dtype changed) on `mesh`, one tensor at a time."""
  source = ParamsSource(cfg, params)
  try:
    return params_from_source(new_cfg, source, mesh)
  finally:
    source.close()


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------

def config_from_hf(hf: dict, path: str = CONFIG, **overrides) -> ModelConfig:
  """ModelConfig from an HF LlamaForCausalLM config.json dict (transformers 4 or 5 style)."""
  archs = hf.get("architectures") or []
  if not any(a in _ARCHITECTURES for a in archs) and hf.get("model_type") not in ("llama",
                                                                                 "mistral"):
    raise ConversionError(f"{path}: unsupported architecture {archs or hf.get('model_type')}; "
                          f"supported: {list(_ARCHITECTURES)}")
  for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                  ("sliding_window", None)):
    if hf.get(key, ok) != ok:
      raise ConversionError(f"{path}: {key}={hf[key]!r} is not supported (a Llama has {ok!r})")
  rope = dict(hf.get("rope_parameters") or {})  # transformers 5
  rope.update(hf.get("rope_scaling") or {})  # transformers 4
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  scaling = {}
  if rope_type == "llama3":
    scaling = dict(rope_scaling_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_len=int(rope["original_max_position_embeddings"]))
  elif rope_type != "default":
    raise ConversionError(f"{path}: rope scaling {rope_type!r} is not supported "
                          "(only default and llama3)")
  d, n = hf["hidden_size"], hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
      n_kv_heads=hf.get("num_key_value_heads") or n, head_dim=hf.get("head_dim") or d // n,
      d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
      rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)), **scaling)
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from None


def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32", bos_token_id=None,
                 eos_token_id=None, pad_token_id=None) -> dict:
  """An HF LlamaForCausalLM config.json dict, readable by transformers 4 and 5."""
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  scaling = None
  if cfg.rope_scaling_factor > 0:
    scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
               "low_freq_factor": cfg.rope_low_freq_factor,
               "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_max_len}
    rope.update(scaling)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": scaling,  # transformers 4
      "rope_parameters": rope,  # transformers 5
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
      "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": cfg.init_std,
      "torch_dtype": dtype, "use_cache": True, "bos_token_id": bos_token_id,
      "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
  }


# ---------------------------------------------------------------------------------------
# Whole checkpoints
# ---------------------------------------------------------------------------------------

def _np_dtype(dtype: str):
  if dtype not in _DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {list(_DTYPES)}")
  import ml_dtypes
  return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]


def write_hf(directory: str, cfg: ModelConfig, params, *, tokenizer=None,
             tokenizer_config: dict | None = None, max_shard_size: str | int = "5GB",
             dtype: str | None = None) -> None:
  """Writes an HF checkpoint into an existing (empty) directory. `params` may be sharded
  over any mesh. Each safetensors file holds at most `max_shard_size` bytes of tensors (as
  transformers counts them; a bigger tensor gets a file of its own)."""
  from safetensors.numpy import save_file
  dtype = dtype or cfg.param_dtype
  np_dtype, limit = _np_dtype(dtype), parse_size(max_shard_size)
  ids = token_ids(tokenizer, tokenizer_config or {})
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump(config_to_hf(cfg, dtype=dtype, **ids), f, indent=2)
  gen = {k: v for k, v in ids.items() if v is not None}
  if gen:
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
  write_tokenizer_files(directory, tokenizer, tokenizer_config)

  shards, current, size, total = [], {}, 0, 0

  def flush():
    nonlocal current, size
    if current:
      name = f"shard-{len(shards):05d}.tmp"
      save_file(current, os.path.join(directory, name), metadata={"format": "pt"})
      os.chmod(os.path.join(directory, name), 0o644)  # safetensors creates files 0600
      shards.append((name, list(current)))
      current, size = {}, 0

  for name, arr in hf_tensors(cfg, params):
    arr = arr.astype(np_dtype)
    if current and size + arr.nbytes > limit:
      flush()
    current[name], size, total = arr, size + arr.nbytes, total + arr.nbytes
  flush()
  if len(shards) == 1:
    os.rename(os.path.join(directory, shards[0][0]), os.path.join(directory, SINGLE))
    return
  weight_map = {}
  for i, (tmp, names) in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    os.rename(os.path.join(directory, tmp), os.path.join(directory, file))
    weight_map.update({n: file for n in names})
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf(path: str, cfg: ModelConfig, params, *, tokenizer=None,
            tokenizer_config: dict | None = None, max_shard_size: str | int = "5GB",
            dtype: str | None = None, overwrite: bool = False) -> None:
  """Writes an HF checkpoint directory at `path`, all or nothing."""
  with atomic_directory(path, overwrite) as tmp:
    write_hf(tmp, cfg, params, tokenizer=tokenizer, tokenizer_config=tokenizer_config,
             max_shard_size=max_shard_size, dtype=dtype)


def load_hf(path: str, mesh=None, **config_overrides) -> tuple[ModelConfig, Any, Any, dict]:
  """(cfg, params on `mesh`, tokenizers.Tokenizer or None, extra) from an HF Llama dir.

  extra: chat_template, bos/eos/pad_token_id, eos_token_ids and the tokenizer_config dict.
  `config_overrides` are ModelConfig fields (param_dtype, scan_layers, ...)."""
  config_path = os.path.join(path, CONFIG)
  if not os.path.isfile(config_path):
    raise ConversionError(f"{path}: no {CONFIG}; is this a Hugging Face model directory?")
  with open(config_path) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{config_path}: not JSON ({e})") from None
  cfg = config_from_hf(hf, config_path, **config_overrides)
  source = SafetensorsSource(path)
  try:
    params = params_from_source(cfg, source, mesh)
  finally:
    source.close()
  tokenizer, tokenizer_config = read_tokenizer_files(path)
  ids = token_ids(tokenizer, tokenizer_config)
  for key in ids:  # config.json's ids when the tokenizer files don't name them
    if ids[key] is None and isinstance(hf.get(key), int):
      ids[key] = hf[key]
  eos = hf.get("eos_token_id")
  eos_ids = tuple(eos) if isinstance(eos, list) else (ids["eos_token_id"],)
  extra = dict(ids, eos_token_ids=tuple(i for i in eos_ids if i is not None),
               chat_template=tokenizer_config.get("chat_template"),
               tokenizer_config=tokenizer_config)
  return cfg, params, tokenizer, extra
