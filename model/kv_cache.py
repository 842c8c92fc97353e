"""The contiguous KV cache: a pytree passed into the model and returned updated, never mutated.

Row b holds `lengths[b]` tokens in slots [0, lengths[b]). A forward over T new tokens writes
them at slots [lengths[b], lengths[b] + T) and advances lengths by the row's real (non-pad)
tokens, so right padding written past the end is simply overwritten by the next step, and a
speculative step is rolled back by lowering `lengths` alone.
"""

import flax
import jax
import jax.numpy as jnp

from model.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  # [L, B, S, K, H], or a tuple of L [B, S, K, H] buffers with unrolled layers (inference:
  # each buffer is updated in place, where a scan over a stacked cache copies it every step).
  k: jax.Array
  v: jax.Array
  lengths: jax.Array  # int32[B]

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    dtype = cfg.compute_dtype if dtype is None else dtype
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1] if isinstance(self.k, (tuple, list)) else self.k.shape[2]


@flax.struct.dataclass
class EmptyCache:
  """`start` for a forward into an empty contiguous cache (prefill). Its type is the static
  promise that no row holds a token yet, so the new tokens attend only to each other: flash
  attention over T tokens instead of scores over all S slots of the cache (the S - T empty
  ones included), and their K/V go to slots [0, T)."""


def write(cache_BSKH: jax.Array, new_BTKH: jax.Array, start_B: jax.Array) -> jax.Array:
  """Writes each row's new entries at its own offset: cache[b, start[b]:start[b]+T] = new[b]."""
  def one_row(c_SKH, n_TKH, s):
    return jax.lax.dynamic_update_slice(c_SKH, n_TKH.astype(c_SKH.dtype), (s, 0, 0))
  return jax.vmap(one_row)(cache_BSKH, new_BTKH, start_B)


@flax.struct.dataclass
class PagedKVCache:
  """A pool of fixed-size pages per layer plus a page table (Kwon et al. 2023, PagedAttention).

  Token `pos` of row b lives in physical page `page_indices[b, pos // P]` at offset `pos % P`.
  Which pages a row owns is host-side bookkeeping (infer/pages.py); here the table is a plain
  input. Page 0 is the null page: unused table entries point at it; it holds only padding,
  which attention never uses.
  """
  # [L, K, num_pages, P, H] (per layer: the layout paged_attention reads), or a tuple of L
  # [K, num_pages, P, H] pools with unrolled layers, as for KVCache.
  k_pages: jax.Array
  v_pages: jax.Array
  page_indices: jax.Array  # int32[B, pages_per_seq]
  lengths: jax.Array  # int32[B]

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, num_pages: int, page_size: int,
           pages_per_seq: int, dtype=None) -> "PagedKVCache":
    dtype = cfg.compute_dtype if dtype is None else dtype
    shape = (cfg.n_layers, cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)
    return cls(k_pages=jnp.zeros(shape, dtype), v_pages=jnp.zeros(shape, dtype),
               page_indices=jnp.zeros((batch, pages_per_seq), jnp.int32),
               lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def page_size(self) -> int:
    pages = self.k_pages
    return pages[0].shape[2] if isinstance(pages, (tuple, list)) else pages.shape[3]


@flax.struct.dataclass
class PageTable:
  """What every layer needs to write and read its pages: broadcast over the layer scan."""
  lengths: jax.Array  # int32[B]: tokens in the cache before this forward
  page_indices: jax.Array  # int32[B, pages_per_seq]


def write_pages(pages_KNPH: jax.Array, new_BTKH: jax.Array, table: PageTable) -> jax.Array:
  """Scatters the T new tokens of each row into its pages at positions lengths[b] + t.

  Right padding is written like real tokens, past the row's length, as in the contiguous
  cache: into the row's own page if it has one there (so the slots between its length and
  lengths + T, which attention treats as filled, hold finite values), else into the null page.
  """
  p = pages_KNPH.shape[2]
  pos = table.lengths[:, None] + jnp.arange(new_BTKH.shape[1])[None, :]  # [B,T]
  logical = pos // p
  in_table = logical < table.page_indices.shape[1]
  page = jnp.take_along_axis(table.page_indices, jnp.where(in_table, logical, 0), axis=1)
  page = jnp.where(in_table, page, 0)  # past the table: the null page, never a row's data
  new_KBTH = jnp.moveaxis(new_BTKH, 2, 0).astype(pages_KNPH.dtype)
  return pages_KNPH.at[:, page, pos % p].set(new_KBTH)
