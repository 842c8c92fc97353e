"""Hugging Face checkpoints (config.json + safetensors) to and from our parameters, for every
family the model runs: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Mixtral and
Qwen3-MoE (`FAMILIES`; their config.json in infer/hf_config.py).

HF stores each weight as `W[out, in]` (`y = x @ W.T`); we store the einsum layout
(`q: [D, N, H]`, `o: [N, H, D]`, `gate: [D, F]`, experts `[E, D, F]`, ...), stacked on a
leading L axis when the layers are scanned. Both use the same half-split RoPE, so q/k need no
permutation here (GGUF's llama architecture does: see infer/gguf.py, which reads through this
file's mapping). Gemma's norms hold w and scale by (1 + w) in HF and in our model alike
(model.norm_plus_one), so they too are copied as they are.

Which tensors a model has follows from its ModelConfig alone (`layer_tensors`); which
architecture it is, from the config.json keys on import and, on export, from the first family
whose config.json reads back as the same model. Experts are written one tensor per expert, as
save_pretrained writes them; transformers 5's fused expert tensors are read too
(`FusedExperts`).

Import builds each parameter with `jax.make_array_from_callback` straight into the target
mesh's shardings: every device asks for its block, read from the memory-mapped safetensors
(only the rows and columns it needs, one layer at a time). Export walks the parameters
tensor by tensor (one layer of a stacked array at a time, `jax.device_get` per tensor) and
writes size-capped safetensors shards. Neither ever holds the whole model on the host.
"""

import dataclasses
import functools
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
from infer.hf_config import CONFIG, config_from_hf, config_to_hf
from model import ModelConfig

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
_DTYPES = ("float32", "bfloat16", "float16")



# ---------------------------------------------------------------------------------------
# Names and layouts
# ---------------------------------------------------------------------------------------

# How our per-layer array A relates to the HF tensor W:
#   same        A = W                              (norm scales, the embedding [V, D])
#   t           A = W.T                            (mlp [D, F] / [F, D], router [D, E],
#                                                   lm_head [D, V])
#   heads_in    A[D, X, H] = W.T.reshape(D, X, H)  (q, k, v: W is [X*H, D])
#   heads_out   A[N, H, D] = W.T.reshape(N, H, D)  (o: W is [D, N*H])
#   heads_bias  A[X, H] = W.reshape(X, H)          (q/k/v biases: W is [X*H])
# A name with "{e}" is one HF tensor per expert: our [E, ...] array holds them stacked.
_ATTENTION = {
    ("attn", "q"): ("self_attn.q_proj.weight", "heads_in"),
    ("attn", "k"): ("self_attn.k_proj.weight", "heads_in"),
    ("attn", "v"): ("self_attn.v_proj.weight", "heads_in"),
    ("attn", "o"): ("self_attn.o_proj.weight", "heads_out"),
}
_QKV_BIAS = {  # Qwen2
    ("attn", "q_bias"): ("self_attn.q_proj.bias", "heads_bias"),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", "heads_bias"),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", "heads_bias"),
}
_QK_NORM = {  # Qwen3, Gemma 3
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "same"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "same"),
}
_NORMS = {
    False: {("attn_norm", "scale"): ("input_layernorm.weight", "same"),
            ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "same")},
    True: {  # Gemma 2/3's sandwich: HF's post_attention_layernorm norms the attention output
        ("attn_norm", "scale"): ("input_layernorm.weight", "same"),
        ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", "same"),
        ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", "same"),
        ("post_mlp_norm", "scale"): ("post_feedforward_layernorm.weight", "same")},
}
_FEED_FORWARD = {
    "dense": {("mlp", "gate"): ("mlp.gate_proj.weight", "t"),
              ("mlp", "up"): ("mlp.up_proj.weight", "t"),
              ("mlp", "down"): ("mlp.down_proj.weight", "t")},
    "mixtral": {("moe", "router"): ("block_sparse_moe.gate.weight", "t"),
                ("moe", "gate"): ("block_sparse_moe.experts.{e}.w1.weight", "t"),
                ("moe", "up"): ("block_sparse_moe.experts.{e}.w3.weight", "t"),
                ("moe", "down"): ("block_sparse_moe.experts.{e}.w2.weight", "t")},
    "qwen3_moe": {("moe", "router"): ("mlp.gate.weight", "t"),
                  ("moe", "gate"): ("mlp.experts.{e}.gate_proj.weight", "t"),
                  ("moe", "up"): ("mlp.experts.{e}.up_proj.weight", "t"),
                  ("moe", "down"): ("mlp.experts.{e}.down_proj.weight", "t")},
}
_GLOBAL = {
    ("embedding",): ("model.embed_tokens.weight", "same"),
    ("final_norm", "scale"): ("model.norm.weight", "same"),
    ("lm_head",): ("lm_head.weight", "t"),
}
# Buffers some checkpoints carry that hold nothing the model needs.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@functools.lru_cache(maxsize=64)
def layer_tensors(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, str]]:
  """{our per-layer path: (HF name after "model.layers.{i}.", layout)} for this config."""
  table = dict(_ATTENTION)
  if cfg.qkv_bias:
    table.update(_QKV_BIAS)
  if cfg.qk_norm:
    table.update(_QK_NORM)
  table.update(_FEED_FORWARD[cfg.router if cfg.n_experts else "dense"])
  table.update(_NORMS[cfg.post_norms])
  return table


def layer_name(layer: int, suffix: str) -> str:
  return f"model.layers.{layer}.{suffix}"


def _layer_names(cfg: ModelConfig, layer: int, suffix: str):
  """One HF name, or a tuple of one per expert."""
  if "{e}" in suffix:
    return tuple(layer_name(layer, suffix.format(e=e)) for e in range(cfg.n_experts))
  return layer_name(layer, suffix)


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return _to_hf(np.empty(shape, np.uint8), kind).shape


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor a model of `cfg` has, in HF's order, with its shape."""
  from model.transformer import layer_specs  # deferred: keeps this module light to import
  specs = traverse_util.flatten_dict(layer_specs(cfg))
  per_layer = []
  for path, (suffix, kind) in layer_tensors(cfg).items():
    shape = specs[path][0]
    if "{e}" in suffix:
      per_layer += [(suffix.format(e=e), _hf_shape(kind, shape[1:]))
                    for e in range(cfg.n_experts)]
    else:
      per_layer.append((suffix, _hf_shape(kind, shape)))
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.d_model)}
  for layer in range(cfg.n_layers):
    shapes.update({layer_name(layer, s): shape for s, shape in per_layer})
  shapes["model.norm.weight"] = (cfg.d_model,)
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
  return shapes


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """Where one of our parameters lives in HF, and its layout. `names` is one HF name, or a
  tuple per leading axis that HF splits into tensors (layers when stacked, then experts)."""
  names: str | tuple
  kind: str


def _leaf(path: tuple[str, ...], cfg: ModelConfig) -> _Leaf:
  if path in _GLOBAL:
    name, kind = _GLOBAL[path]
    return _Leaf(name, kind)
  head, rest = path[0], tuple(path[1:])
  table = layer_tensors(cfg)
  if rest in table:
    suffix, kind = table[rest]
    if head == "layers":
      return _Leaf(tuple(_layer_names(cfg, i, suffix) for i in range(cfg.n_layers)), kind)
    if m := re.fullmatch(r"layers_(\d+)", head):
      return _Leaf(_layer_names(cfg, int(m.group(1)), suffix), kind)
  raise ConversionError(f"parameter {'/'.join(path)} has no Hugging Face counterpart")


def _flat_names(names, at=()) -> Iterator[tuple[tuple[int, ...], str]]:
  """(index into our leading axes, HF name) for each tensor of a leaf."""
  if isinstance(names, str):
    yield at, names
  else:
    for i, inner in enumerate(names):
      yield from _flat_names(inner, at + (i,))


def _to_hf(a: np.ndarray, kind: str) -> np.ndarray:
  if kind == "same":
    return a
  if kind == "t":
    return a.T
  if kind == "heads_in":  # [D, X, H] -> [X*H, D]
    return a.reshape(a.shape[0], -1).T
  if kind == "heads_out":  # [N, H, D] -> [D, N*H]
    return a.reshape(-1, a.shape[-1]).T
  if kind == "heads_bias":  # [X, H] -> [X*H]
    return a.reshape(-1)
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
  if kind == "heads_bias":  # A[x, j] = W[x*H + j]
    sx, sh = index
    return source.read(name, (slice(sx.start * h, sx.stop * h),)).reshape(-1, h)[:, sh]
  raise AssertionError(kind)


def _read_block(source, names, kind: str, cfg: ModelConfig, index: tuple[slice, ...]):
  """Block `index` of a leaf whose leading axes are split over the HF tensors `names`."""
  if isinstance(names, str):
    return _read_ours(source, names, kind, cfg, index)
  return np.stack([_read_block(source, names[i], kind, cfg, index[1:])
                   for i in range(index[0].start, index[0].stop)])


# ---------------------------------------------------------------------------------------
# Tensor sources: safetensors directories and in-memory dicts (GGUF)
# ---------------------------------------------------------------------------------------

class ArraySource:
  """HF-named tensors held in memory, or made on demand by a callable (infer/gguf.py
  dequantizes that way). Made tensors are kept until `release()`, which
  params_from_source calls after each parameter: the host holds one parameter's tensors.

  parts: {name: (whole, i)}: tensor `name` is `arrays[whole][i]` (GGUF stacks the experts
  of a layer in one tensor, made once for all of them); wholes are not names themselves."""

  def __init__(self, arrays: dict, path: str, where: dict[str, str] | None = None,
               shapes: dict[str, tuple[int, ...]] | None = None,
               parts: dict[str, tuple[str, int]] | None = None):
    self.arrays, self.path, self._where = arrays, path, where or {}
    self._shapes, self._made, self._parts = shapes or {}, {}, parts or {}
    self._wholes = {whole for whole, _ in self._parts.values()}

  def names(self):
    return [n for n in self.arrays if n not in self._wholes] + list(self._parts)

  def shape(self, name):
    if name in self._shapes:
      return tuple(self._shapes[name])
    return tuple(self._tensor(name).shape)

  def where(self, name) -> str:
    return self._where.get(name, self.path)

  def _tensor(self, name):
    if name in self._parts:
      whole, i = self._parts[name]
      return self._tensor(whole)[i]
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


# transformers 5 holds a layer's experts as two tensors (and saves them so with
# save_pretrained(save_original_format=False)): gate_up_proj [E, 2F, D] (gate rows first) and
# down_proj [E, D, F], the router as mlp.gate for Mixtral too.
_FUSED = {("moe", "router"): ("mlp.gate.weight", None),
          ("moe", "gate"): ("mlp.experts.gate_up_proj", 0),
          ("moe", "up"): ("mlp.experts.gate_up_proj", 1),
          ("moe", "down"): ("mlp.experts.down_proj", None)}


class FusedExperts:
  """A source whose experts are stored fused, seen under the per-expert names of the
  family (what save_pretrained writes by default): each expert's [F, D] / [D, F] matrix is a
  slice of the fused tensor, read as such."""

  def __init__(self, source, cfg: ModelConfig):
    self.source, self.path, self._map = source, source.path, {}
    for layer in range(cfg.n_layers):
      for path, (suffix, _) in _FEED_FORWARD[cfg.router].items():
        fused, half = _FUSED[path]
        names = _layer_names(cfg, layer, suffix)
        for e, name in enumerate((names,) if isinstance(names, str) else names):
          self._map[name] = (layer_name(layer, fused), None if isinstance(names, str) else e,
                             half)
    self._fused = {fused for fused, _, _ in self._map.values()}

  @staticmethod
  def applies(source) -> bool:
    return any(n.endswith(".mlp.experts.gate_up_proj") for n in source.names())

  def names(self):
    present = set(self.source.names())
    return [n for n in present - self._fused] + [
        n for n, (fused, _, _) in self._map.items() if fused in present]

  def shape(self, name):
    if name not in self._map:
      return self.source.shape(name)
    fused, e, half = self._map[name]
    shape = self.source.shape(fused)
    if e is None:
      return shape
    rows, cols = shape[1:]
    return (rows // 2, cols) if half is not None else (rows, cols)

  def where(self, name) -> str:
    return self.source.where(self._map.get(name, (name,))[0])

  def read(self, name, index):
    if name not in self._map:
      return self.source.read(name, index)
    fused, e, half = self._map[name]
    if e is None:
      return self.source.read(fused, index)
    rows, cols = _norm(index, self.shape(name))
    if half:  # the up half: rows F..2F of gate_up_proj
      f = self.shape(name)[0]
      rows = slice(rows.start + f, rows.stop + f)
    return self.source.read(fused, (slice(e, e + 1), rows, cols))[0]

  def close(self):
    self.source.close()


class ParamsSource:
  """Our own parameters seen as HF-named tensors, one layer at a time: lets any layout be
  rebuilt into another (scanned <-> unrolled layers, another mesh) by params_from_source."""

  def __init__(self, cfg: ModelConfig, params, path: str = "(parameters)"):
    self.cfg, self.path, self._by_name = cfg, path, {}
    for key, value in traverse_util.flatten_dict(params).items():
      leaf = _leaf(key, cfg)
      for at, name in _flat_names(leaf.names):
        self._by_name[name] = (value, at, leaf.kind)
    self._last = (None, None)

  def names(self):
    return list(self._by_name)

  def where(self, name):
    return self.path

  def _tensor(self, name):
    if self._last[0] != name:  # consecutive reads of one tensor are the norm
      value, at, kind = self._by_name[name]
      arr = np.asarray(jax.device_get(value[at] if at else value), np.float32)
      self._last = (name, _to_hf(arr, kind))
    return self._last[1]

  def shape(self, name):
    value, at, kind = self._by_name[name]
    return _hf_shape(kind, value.shape[len(at):])

  def read(self, name, index):
    return self._tensor(name)[tuple(index)]

  def close(self):
    self._last = (None, None)


def check_tensors(cfg: ModelConfig, source) -> None:
  """Every tensor the config needs is there with the right shape, and nothing unknown is."""
  expected = hf_shapes(cfg)
  names = set(source.names())
  dims = (f"vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, n_heads={cfg.n_heads}, "
          f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, d_ff={cfg.d_ff}"
          + (f", n_experts={cfg.n_experts}, moe_d_ff={cfg.moe_d_ff or cfg.d_ff}"
             if cfg.n_experts else ""))
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
    raise ConversionError(f"{source.where(unknown[0])}: tensors a model of this config does "
                          f"not have: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")


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
        arr = _read_block(source, leaf.names, leaf.kind, cfg, index)
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
  """(cfg, params on `mesh`, tokenizers.Tokenizer or None, extra) from an HF checkpoint
  directory of any family in FAMILIES.

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
  if cfg.n_experts and FusedExperts.applies(source):
    source = FusedExperts(source, cfg)
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
