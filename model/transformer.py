"""The decoder: embedding, a stack of blocks (model/layers.py), final norm, output head.

One forward for every use (training, prefill, decoding, scoring; README, "Layout"):
  logits, cache = Transformer(cfg).apply({"params": params}, tokens, positions,
                                         segment_ids=None, cache=None)
or, on any parameter tree (the module's, or model/fused.py's inference layout):
  logits, cache, aux = forward(cfg, params, tokens, positions, segment_ids=None, cache=None)
tokens, positions, segment_ids: int32[B, T]; logits: float32[B, T, V]. Training passes no
cache (and gets None back); prefill and decode pass a KVCache or PagedKVCache and get the
updated one. With cfg.value_head the output is a scalar per position, values: float32[B, T]
(a reward model or PPO critic: the backbone of a language model with a head read at chosen
tokens). `segment_ids` marks packed documents (a token attends only within its own segment);
with a cache it marks padding instead (0 = pad, not counted in the new lengths). `aux` holds
the mixture-of-experts router statistics (moe.MoEAux, averaged over layers; None when dense);
the module sows it as "intermediates"/"moe" (apply with mutable=["intermediates"]).

Two options serve inference at scale:
  empty_cache=True  the (contiguous) cache holds nothing yet (prefill): the tokens attend only
                    to each other through flash attention, never to the cache's S slots;
  logits_at         int32[B]: the final norm and head run only at position logits_at[b] of
                    each row (the one sampled from), giving [B, V] (values [B], hidden
                    [B, D]) instead of [B, T, V], which at T = 2048 and V = 49152 is 400 MB
                    of f32 per row; int32[B, M]: at M positions per row, giving [B, M, V].

A kv_cache.PackedPagedKVCache runs groups of rows of different lengths (a serving engine's
prefill chunks and decode rows) as one row of tokens [1, N] through one forward
(kv_cache.PackedTables); positions are then each token's own (`PackedTables.positions`).

Layers: a stacked tree (params["layers"], every leaf [L, ...]) runs as a `lax.scan`, one step
per period of the local/global pattern (cfg.layer_period layers, unrolled inside the step, so
each layer's window is static); a tuple of per-layer trees (the inference layout) or an
unrolled module tree ("layers_0", ...) runs layer by layer, so a cache held as one buffer per
layer is updated in place.
"""

import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import moe
from model.config import ModelConfig
from model.fused import Packed
from model.kv_cache import EmptyCache, KVCache, PackedPagedKVCache, PagedKVCache, PageTable
from model.layers import block, rms_norm, rope_tables
from model.sharding import constrain

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ---------------------------------------------------------------------------------------------
# Parameters: (shape, logical axes, init) per leaf; the module declares them from these tables.

def _normal(std):
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def _norm_spec(cfg: ModelConfig, width: int):
  init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
  return {"scale": ((width,), ("norm",), init)}


def layer_specs(cfg: ModelConfig) -> dict:
  """One block's weights: {name: (shape, logical axes, init)}, nested as the tree."""
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  w, out = _normal(cfg.init_std), _normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
  attn = {"q": ((d, n, h), ("embed", "heads", "head_dim"), w),
          "k": ((d, k, h), ("embed", "kv_heads", "head_dim"), w),
          "v": ((d, k, h), ("embed", "kv_heads", "head_dim"), w),
          "o": ((n, h, d), ("heads", "head_dim", "embed"), out)}
  if cfg.qkv_bias:
    zeros = nn.initializers.zeros
    attn.update(q_bias=((n, h), ("heads", "head_dim"), zeros),
                k_bias=((k, h), ("kv_heads", "head_dim"), zeros),
                v_bias=((k, h), ("kv_heads", "head_dim"), zeros))
  if cfg.qk_norm:
    attn.update(q_norm=_norm_spec(cfg, h), k_norm=_norm_spec(cfg, h))
  specs = {"attn_norm": _norm_spec(cfg, d), "attn": attn, "mlp_norm": _norm_spec(cfg, d)}
  if cfg.post_norms:
    specs.update(post_attn_norm=_norm_spec(cfg, d), post_mlp_norm=_norm_spec(cfg, d))
  if cfg.n_experts:
    e, fe = cfg.n_experts, cfg.moe_d_ff or f
    specs["moe"] = {"router": ((d, e), ("embed", None), w),
                    "gate": ((e, d, fe), ("expert", "embed", "mlp"), w),
                    "up": ((e, d, fe), ("expert", "embed", "mlp"), w),
                    "down": ((e, fe, d), ("expert", "mlp", "embed"), out)}
  else:
    specs["mlp"] = {"gate": ((d, f), ("embed", "mlp"), w), "up": ((d, f), ("embed", "mlp"), w),
                    "down": ((f, d), ("mlp", "embed"), out)}
  return specs


def _is_spec(x) -> bool:
  return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], tuple)


def _init_tree(specs, key, dtype, stack: int = 0):
  """Boxed (nn.Partitioned) leaves from `specs`, each from its own key (folded from its path);
  with stack > 0 every leaf gets a leading "layers" axis of that length."""
  def leaf(path, spec):
    shape, axes, init = spec
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    leaf_key = jax.random.fold_in(key, zlib.crc32(name.encode()))
    if stack:
      shape, axes = (stack, *shape), ("layers", *axes)
    return nn.Partitioned(init(leaf_key, shape, dtype), axes)
  return jax.tree_util.tree_map_with_path(leaf, specs, is_leaf=_is_spec)


# ---------------------------------------------------------------------------------------------
# The forward.

def _layer_list(cfg: ModelConfig, params):
  """(stacked tree or None, list of per-layer trees or None)."""
  layers = params.get("layers")
  if isinstance(layers, (tuple, list)):
    return None, list(layers)
  if layers is not None:
    return layers, None
  return None, [params[f"layers_{i}"] for i in range(cfg.n_layers)]


def _mean_aux(auxes):
  """Router statistics averaged over layers (dropped assignments summed)."""
  auxes = [a for a in auxes if a is not None]
  if not auxes:
    return None
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *auxes)
  return _reduce_aux(stacked)


def _reduce_aux(stacked):
  return moe.MoEAux(load_balancing_loss=jnp.mean(stacked.load_balancing_loss),
                    z_loss=jnp.mean(stacked.z_loss),
                    expert_load=jnp.mean(stacked.expert_load, axis=0),
                    dropped=jnp.sum(stacked.dropped))


def _chain(run_block, weights, x, kvs, layers):
  """x through the blocks with `weights` at static indices `layers`; kvs: each one's cache
  arrays (a tuple: k, v and, int8, their scales) or None. Returns (x, new kvs, auxes)."""
  new_kvs, auxes = [], []
  for w, kv, i in zip(weights, kvs, layers):
    x, kv, aux = run_block(w, x, kv, i)
    auxes.append(aux)
    if kv is not None:
      new_kvs.append(kv)
  return x, new_kvs, auxes


def _stack(new_kvs):
  """Per-layer tuples of cache arrays -> one [L, ...] array per kind (k, v, ...)."""
  return tuple(jnp.stack(arrays) for arrays in zip(*new_kvs))


def _run_layers(cfg: ModelConfig, params, x, ropes, segment_ids, start, layers_kv, token_mask):
  """x through every block; returns (x, new cache arrays (as given: a tuple of stacked arrays
  or of per-layer tuples, one per kind: k, v and, int8, their scales), aux)."""
  stacked, per_layer = _layer_list(cfg, params)
  remat = cfg.remat != "none" and layers_kv is None
  kvs_of = lambda layers: ([None] * len(layers) if layers_kv is None
                           else [tuple(kind[i] for kind in layers_kv) for i in layers])

  def run_block(w, x, kv, layer):  # layer: the static index that fixes window and RoPE
    local = cfg.is_local(layer)
    return block(cfg, w, x, ropes["local" if local else "global"], segment_ids, start, kv,
                 local=local, token_mask=token_mask)

  if per_layer is not None:
    run = run_block
    if remat:
      run = lambda w, x, kv, i: jax.checkpoint(
          lambda w, x, kv: run_block(w, x, kv, i), policy=_REMAT_POLICIES[cfg.remat],
          prevent_cse=True)(w, x, kv)
    layers = range(len(per_layer))
    x, new_kvs, auxes = _chain(run, per_layer, x, kvs_of(layers), layers)
    if layers_kv is None:
      return x, None, _mean_aux(auxes)
    if isinstance(layers_kv[0], (tuple, list)):
      return x, tuple(tuple(arrays) for arrays in zip(*new_kvs)), _mean_aux(auxes)
    return x, _stack(new_kvs), _mean_aux(auxes)

  # Stacked: scan over groups of `period` layers (the local/global pattern repeats per group).
  period = cfg.layer_period
  n_groups, rest = divmod(cfg.n_layers, period)
  layer_of = lambda tree, i: jax.tree.map(lambda a: a[i], tree)

  def body(x, xs):
    w_group, kv_group = xs
    weights = [layer_of(w_group, j) for j in range(period)]
    kvs = ([None] * period if kv_group is None
           else [tuple(kind[j] for kind in kv_group) for j in range(period)])
    x, new_kvs, auxes = _chain(run_block, weights, x, kvs, range(period))
    new_kv = None if kv_group is None else _stack(new_kvs)
    aux = None if auxes[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *auxes)
    return x, (new_kv, aux)

  if remat:
    body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
  head_n = n_groups * period
  xs = (jax.tree.map(lambda a: a[:head_n].reshape(n_groups, period, *a.shape[1:]), stacked),
        None if layers_kv is None else jax.tree.map(
            lambda a: a[:head_n].reshape(n_groups, period, *a.shape[1:]), layers_kv))
  x, (new_kv, aux) = jax.lax.scan(body, x, xs)
  flat = lambda a: a.reshape(head_n, *a.shape[2:])
  new_kv = None if new_kv is None else jax.tree.map(flat, new_kv)
  aux = None if aux is None else jax.tree.map(flat, aux)
  if rest:  # layers past the last whole period, unrolled (their index fixes their type)
    tail = range(head_n, cfg.n_layers)
    x, tail_kvs, tail_aux = _chain(run_block, [layer_of(stacked, i) for i in tail], x,
                                   kvs_of(tail), tail)
    if new_kv is not None:
      new_kv = tuple(jnp.concatenate([a, t]) for a, t in zip(new_kv, _stack(tail_kvs)))
    if aux is not None:
      aux = jax.tree.map(lambda a, *t: jnp.concatenate([a, jnp.stack(t)]), aux, *tail_aux)
  return x, new_kv, None if aux is None else _reduce_aux(aux)


def _head(cfg: ModelConfig, params, x_BTD):
  """Logits f32[B, T, V] (or values f32[B, T]) from final-normed hidden states."""
  dt = cfg.compute_dtype
  if cfg.value_head:
    return jnp.einsum("BTD,D->BT", x_BTD, params["value_head"].astype(dt),
                      preferred_element_type=jnp.float32)
  if isinstance(params.get("head"), Packed):
    logits = params["head"](x_BTD, dt, accumulate=jnp.float32)
  elif cfg.tie_embeddings:
    logits = jnp.einsum("BTD,VD->BTV", x_BTD, params["embedding"].astype(dt),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("BTD,DV->BTV", x_BTD, params["lm_head"].astype(dt),
                        preferred_element_type=jnp.float32)
  if cfg.final_softcap:
    logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
  return constrain(logits, ("batch", "length", "act_vocab"))


def embed(cfg: ModelConfig, params, tokens):
  x = jnp.take(params["embedding"], tokens, axis=0).astype(cfg.compute_dtype)
  if cfg.embed_scale:  # Gemma: sqrt(D), rounded to the compute dtype as HF does
    x = x * jnp.asarray(math.sqrt(cfg.d_model), cfg.compute_dtype)
  return constrain(x, ("batch", "length", "act_embed"))


def forward(cfg: ModelConfig, params, tokens, positions, segment_ids=None,
            cache: KVCache | PagedKVCache | None = None, *, return_hidden: bool = False,
            empty_cache: bool = False, logits_at=None):
  """(logits or values or hidden, the updated cache or None, moe.MoEAux or None): see the
  module docstring. `params`: the module's tree (unboxed) or a model/fused.py prepared one."""
  if empty_cache and not isinstance(cache, KVCache):
    raise ValueError(f"empty_cache=True needs a contiguous KVCache, got "
                     f"{type(cache).__name__}")
  x = embed(cfg, params, tokens)
  # Tokens attend to each other by segment (with a cache: only when it starts empty).
  attn_segments = segment_ids if cache is None or empty_cache else None
  token_mask = None if segment_ids is None else segment_ids != 0
  packed = isinstance(cache, PackedPagedKVCache)
  paged = packed or isinstance(cache, PagedKVCache)
  # Per kind, every layer's cache arrays: k, v and (int8 only) their scales.
  scales = () if cache is None or cache.k_scale is None else (cache.k_scale, cache.v_scale)
  if paged:  # the layers find their pages through the (broadcast) page table(s)
    start = (cache.tables if packed
             else PageTable(lengths=cache.lengths, page_indices=cache.page_indices))
    layers_kv = (cache.k_pages, cache.v_pages, *scales)
  else:
    start = None if cache is None else EmptyCache() if empty_cache else cache.lengths
    layers_kv = None if cache is None else (cache.k, cache.v, *scales)

  x, new_kv, aux = _run_layers(cfg, params, x, rope_tables(positions, cfg), attn_segments,
                               start, layers_kv, token_mask)
  if logits_at is not None:  # [B, M, D]: norm and head only where they are read
    at_BM = logits_at[:, None] if logits_at.ndim == 1 else logits_at
    x = jnp.take_along_axis(x, at_BM[:, :, None], axis=1)
  x = rms_norm(x, params["final_norm"]["scale"], cfg)
  out = x if return_hidden else _head(cfg, params, x)
  if logits_at is not None and logits_at.ndim == 1:
    out = out[:, 0]

  if cache is None:
    return out, None, aux
  t = tokens.shape[1]
  added = t if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
  new_scales = dict(k_scale=new_kv[2], v_scale=new_kv[3]) if scales else {}
  if packed:
    return out, cache.replace(k_pages=new_kv[0], v_pages=new_kv[1], **new_scales), aux
  if paged:
    return out, cache.replace(k_pages=new_kv[0], v_pages=new_kv[1],
                              lengths=cache.lengths + added, **new_scales), aux
  return out, KVCache(k=new_kv[0], v=new_kv[1], lengths=cache.lengths + added,
                      **new_scales), aux


class Transformer(nn.Module):
  """The module: declares the parameters (with their logical axes) and runs `forward`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions, segment_ids=None,
               cache: KVCache | PagedKVCache | None = None,
               *, return_hidden: bool = False, empty_cache: bool = False, logits_at=None):
    cfg = self.cfg
    dt = cfg.weight_dtype
    param = lambda name, specs, stack=0: self.param(
        name, lambda key: _init_tree(specs, key, dt, stack))
    params = {"embedding": param("embedding", ((cfg.vocab_size, cfg.d_model),
                                               ("vocab", "embed"), _normal(cfg.init_std))),
              "final_norm": param("final_norm", _norm_spec(cfg, cfg.d_model))}
    if cfg.scan_layers:
      params["layers"] = param("layers", layer_specs(cfg), cfg.n_layers)
    else:
      for i in range(cfg.n_layers):
        params[f"layers_{i}"] = param(f"layers_{i}", layer_specs(cfg))
    if cfg.value_head:  # zero-initialised: a new head predicts 0 whatever the backbone
      params["value_head"] = param("value_head",
                                   ((cfg.d_model,), ("embed",), nn.initializers.zeros))
    elif not cfg.tie_embeddings:
      params["lm_head"] = param("lm_head", ((cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                            _normal(cfg.init_std)))
    out, cache, aux = forward(cfg, params, tokens, positions, segment_ids, cache,
                              return_hidden=return_hidden, empty_cache=empty_cache,
                              logits_at=logits_at)
    if aux is not None:
      self.sow("intermediates", "moe", aux)
    return out, cache
