"""The decoder: embedding, a stack of blocks (scanned or unrolled), final norm, output head.

One forward for every use (see ARCHITECTURE.md):
  logits, cache = Transformer(cfg).apply({"params": params}, tokens, positions,
                                         segment_ids=None, cache=None)
tokens, positions, segment_ids: int32[B, T]; logits: float32[B, T, V]. Training passes no
cache (and gets None back); prefill and decode pass a KVCache and get the updated one.
With cfg.value_head the output is a scalar per position, values: float32[B, T] (a reward
model or PPO critic: the backbone of a language model with a head read at chosen tokens).
`segment_ids` marks packed documents (a token attends only within its own segment); with a
cache it marks padding instead (0 = pad, not counted in the new lengths).

Two options serve inference at scale:
  empty_cache=True  the (contiguous) cache holds nothing yet (prefill): the tokens attend only
                    to each other through flash attention, never to the cache's S slots;
  logits_at         int32[B]: the final norm and head run only at position logits_at[b] of
                    each row (the one sampled from), giving [B, V] (values [B], hidden
                    [B, D]) instead of [B, T, V], which at T = 2048 and V = 49152 is 400 MB
                    of f32 per row.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.kv_cache import EmptyCache, KVCache, PagedKVCache, PageTable
from model.layers import Block, RMSNorm, _param, rope_table
from model.sharding import constrain

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(cfg: ModelConfig):
  if cfg.remat == "none":
    return Block
  # prevent_cse is only needed outside scan (scan already stops XLA merging the recompute).
  return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions, segment_ids=None,
               cache: KVCache | PagedKVCache | None = None,
               *, return_hidden: bool = False, empty_cache: bool = False, logits_at=None):
    cfg = self.cfg
    if cfg.n_experts:
      # model/moe.py's layer is built and tested on its own; the block does not call it yet.
      raise ValueError(f"model.n_experts={cfg.n_experts}: the decoder block has no "
                       "mixture-of-experts feed-forward yet; set model.n_experts=0")
    embedding = _param(self, "embedding", nn.initializers.normal(cfg.init_std),
                       (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.weight_dtype)
    x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    # Tokens attend to each other by segment (with a cache: only when it starts empty).
    attn_segments = segment_ids if cache is None or empty_cache else None
    paged = isinstance(cache, PagedKVCache)
    if empty_cache and not isinstance(cache, KVCache):
      raise ValueError(f"empty_cache=True needs a contiguous KVCache, got "
                       f"{type(cache).__name__}")
    if paged:  # the layers find their pages through the (broadcast) page table
      start = PageTable(lengths=cache.lengths, page_indices=cache.page_indices)
      layers_kv = (cache.k_pages, cache.v_pages)
    else:
      start = None if cache is None else EmptyCache() if empty_cache else cache.lengths
      layers_kv = None if cache is None else (cache.k, cache.v)

    rope = rope_table(positions, cfg)
    block = _block_class(cfg)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                      length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_kv = stack(cfg, name="layers")(x, rope, attn_segments, start, layers_kv)
    else:
      new_k, new_v = [], []
      for i in range(cfg.n_layers):
        layer_kv = None if cache is None else (layers_kv[0][i], layers_kv[1][i])
        x, kv = block(cfg, name=f"layers_{i}")(x, rope, attn_segments, start, layer_kv)
        if kv is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
      if cache is None:
        new_kv = None
      elif isinstance(layers_kv[0], (tuple, list)):
        # A cache held as one buffer per layer (inference) stays so: each layer's buffer is
        # updated in place, where stacking would copy the whole cache every step.
        new_kv = (tuple(new_k), tuple(new_v))
      else:
        new_kv = (jnp.stack(new_k), jnp.stack(new_v))

    if logits_at is not None:  # [B, 1, D]: norm and head only where they are read
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = RMSNorm(cfg, name="final_norm")(x)
    if return_hidden:
      out = x
    elif cfg.value_head:
      # Zero-initialised: a new head starts by predicting 0 whatever the backbone.
      head = _param(self, "value_head", nn.initializers.zeros, (cfg.d_model,), ("embed",),
                    cfg.weight_dtype)
      out = jnp.einsum("BTD,D->BT", x, head.astype(cfg.compute_dtype),
                       preferred_element_type=jnp.float32)
    elif cfg.tie_embeddings:
      out = jnp.einsum("BTD,VD->BTV", x, embedding.astype(cfg.compute_dtype),
                       preferred_element_type=jnp.float32)
    else:
      head = _param(self, "lm_head", nn.initializers.normal(cfg.init_std),
                    (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.weight_dtype)
      out = jnp.einsum("BTD,DV->BTV", x, head.astype(cfg.compute_dtype),
                       preferred_element_type=jnp.float32)
    if not return_hidden and not cfg.value_head:
      out = constrain(out, ("batch", "length", "act_vocab"))
    if logits_at is not None:
      out = out[:, 0]

    if cache is None:
      return out, None
    t = tokens.shape[1]
    added = t if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    if paged:
      return out, cache.replace(k_pages=new_kv[0], v_pages=new_kv[1],
                                lengths=cache.lengths + added)
    return out, KVCache(k=new_kv[0], v=new_kv[1], lengths=cache.lengths + added)
