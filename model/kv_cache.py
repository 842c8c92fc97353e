"""The contiguous KV cache: a pytree passed into the model and returned updated, never mutated.

Row b holds `lengths[b]` tokens in slots [0, lengths[b]). A forward over T new tokens writes
them at slots [lengths[b], lengths[b] + T) and advances lengths by the row's real (non-pad)
tokens, so right padding written past the end is simply overwritten by the next step, and a
speculative step is rolled back by lowering `lengths` alone.

With `dtype="int8"` either cache holds K and V quantized symmetrically per (token, KV head):
s = max|x| / 127 over the head dim, codes round(x / s) as int8, and the f32 scales s beside
them (`k_scale`, `v_scale`: the cache's shape without the head dim). The scales stay f32: they
are 4 bytes next to H int8 ones (3% at H = 128), and rounding them to bf16 would add a 0.4%
error to every element on top of the codes' s / 2. Attention never forms the dequantized cache:
the K scale multiplies each score after the q.k dot and the V scale each probability before the
p.v dot (exact algebra; `pallas_kernels.attention.cached_attention`, `paged_attention`). Other
dtypes keep the cache as it was, with no scale leaves (None).
"""

from typing import Sequence

import flax
import jax
import jax.numpy as jnp

from model.config import ModelConfig

CACHE_DTYPES = ("bfloat16", "float32", "int8")


def storage_dtype(cfg: ModelConfig, dtype=None, name: str = "kv_cache_dtype"):
  """The dtype K/V are stored in: None means the model's compute dtype; "int8" quantizes.
  Anything else outside CACHE_DTYPES is an error naming `name` (the flag or key)."""
  if dtype is None:
    return jnp.dtype(cfg.compute_dtype)
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or dt.name not in CACHE_DTYPES:
    raise ValueError(f"{name} must be one of {CACHE_DTYPES} (or None: the compute dtype), "
                     f"got {dtype!r}")
  return dt


def _zeros(shape, dtype, layers: int | None):
  """[L, *shape] zeros, or (layers given) a tuple of `layers` [*shape] buffers."""
  if layers is None:
    return jnp.zeros(shape, dtype)
  return tuple(jnp.zeros(shape, dtype) for _ in range(layers))


def quantize(x_NH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 over the last (head) axis: (codes int8 [..., H], scale f32 [...]) with
  x ~= codes * scale, scale = max|x| / 127 (0 for an all-zero head: codes 0)."""
  x = x_NH.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  codes = jnp.round(x / jnp.where(scale == 0, 1.0, scale)[..., None])
  return codes.astype(jnp.int8), scale


@flax.struct.dataclass
class KVCache:
  # [L, B, S, K, H], or a tuple of L [B, S, K, H] buffers with unrolled layers (inference:
  # each buffer is updated in place, where a scan over a stacked cache copies it every step).
  k: jax.Array
  v: jax.Array
  lengths: jax.Array  # int32[B]
  # int8 caches only: f32 [L, B, S, K] (or a tuple of L [B, S, K]), x = k * k_scale[..., None].
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None,
           per_layer: bool = False) -> "KVCache":
    """Zeros; dtype as `storage_dtype`. per_layer: a tuple of L buffers (updated in place)."""
    dtype = storage_dtype(cfg, dtype)
    layers = cfg.n_layers if per_layer else None
    shape = (batch, max_len, cfg.n_kv_heads)
    if layers is None:
      shape = (cfg.n_layers, *shape)
    scales = (dict(k_scale=_zeros(shape, jnp.float32, layers),
                   v_scale=_zeros(shape, jnp.float32, layers)) if dtype == jnp.int8 else {})
    return cls(k=_zeros((*shape, cfg.head_dim), dtype, layers),
               v=_zeros((*shape, cfg.head_dim), dtype, layers),
               lengths=jnp.zeros((batch,), jnp.int32), **scales)

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1] if isinstance(self.k, (tuple, list)) else self.k.shape[2]

  def take_rows(self, rows_R: jax.Array) -> "KVCache":
    """A cache of R rows, row r a copy of row rows_R[r] (K, V, scales and length): beam
    search copies a prompt's cache to its beams and reorders beams by their parents."""
    def take(buf):  # stacked [L, B, ...], or a tuple of L [B, ...]
      if buf is None:
        return None
      if isinstance(buf, (tuple, list)):
        return tuple(jnp.take(b, rows_R, axis=0) for b in buf)
      return jnp.take(buf, rows_R, axis=1)
    return self.replace(k=take(self.k), v=take(self.v), lengths=self.lengths[rows_R],
                        k_scale=take(self.k_scale), v_scale=take(self.v_scale))


@flax.struct.dataclass
class EmptyCache:
  """`start` for a forward into an empty contiguous cache (prefill). Its type is the static
  promise that no row holds a token yet, so the new tokens attend only to each other: flash
  attention over T tokens instead of scores over all S slots of the cache (the S - T empty
  ones included), and their K/V go to slots [0, T)."""


def write(cache_BSKH: jax.Array, new_BTKH: jax.Array, start_B: jax.Array) -> jax.Array:
  """Writes each row's new entries at its own offset: cache[b, start[b]:start[b]+T] = new[b].
  Also for scales: cache [B, S, K], new [B, T, K]."""
  def one_row(c_SKH, n_TKH, s):
    return jax.lax.dynamic_update_slice(c_SKH, n_TKH.astype(c_SKH.dtype),
                                        (s,) + (0,) * (c_SKH.ndim - 1))
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
  # int8 pools only: f32 [L, K, num_pages, P] (or a tuple of L [K, num_pages, P]).
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, num_pages: int, page_size: int,
           pages_per_seq: int, dtype=None, per_layer: bool = False) -> "PagedKVCache":
    """Zeros; dtype as `storage_dtype`. per_layer: a tuple of L pools (updated in place)."""
    dtype = storage_dtype(cfg, dtype)
    layers = cfg.n_layers if per_layer else None
    shape = (cfg.n_kv_heads, num_pages, page_size)
    if layers is None:
      shape = (cfg.n_layers, *shape)
    scales = (dict(k_scale=_zeros(shape, jnp.float32, layers),
                   v_scale=_zeros(shape, jnp.float32, layers)) if dtype == jnp.int8 else {})
    return cls(k_pages=_zeros((*shape, cfg.head_dim), dtype, layers),
               v_pages=_zeros((*shape, cfg.head_dim), dtype, layers),
               page_indices=jnp.zeros((batch, pages_per_seq), jnp.int32),
               lengths=jnp.zeros((batch,), jnp.int32), **scales)

  @property
  def page_size(self) -> int:
    pages = self.k_pages
    return pages[0].shape[2] if isinstance(pages, (tuple, list)) else pages.shape[3]


@flax.struct.dataclass
class PageTable:
  """What every layer needs to write and read its pages: broadcast over the layer scan."""
  lengths: jax.Array  # int32[B]: tokens in the cache before this forward
  page_indices: jax.Array  # int32[B, pages_per_seq]


def _page_slots(table: PageTable, t: int, page_size: int):
  """(physical page, slot in it) int32[B, T] of each row's T new tokens, at lengths[b] + t."""
  pos = table.lengths[:, None] + jnp.arange(t)[None, :]  # [B,T]
  logical = pos // page_size
  in_table = logical < table.page_indices.shape[1]
  page = jnp.take_along_axis(table.page_indices, jnp.where(in_table, logical, 0), axis=1)
  page = jnp.where(in_table, page, 0)  # past the table: the null page, never a row's data
  return page, pos % page_size


def write_pages(pages_KNPH: jax.Array, new_BTKH: jax.Array,
                table: "PageTable | PackedTables") -> jax.Array:
  """Scatters the T new tokens of each row into its pages at positions lengths[b] + t.
  Also for scales: pages [K, num_pages, P], new [B, T, K]. With PackedTables (new [1, N, ...])
  every group's tokens go in the same one scatter.

  Right padding is written like real tokens, past the row's length, as in the contiguous
  cache: into the row's own page if it has one there (so the slots between its length and
  lengths + T, which attention treats as filled, hold finite values), else into the null page.
  """
  p = pages_KNPH.shape[2]
  if isinstance(table, PackedTables):
    page, slot = (table.join(x) for x in zip(*(
        _page_slots(t, n, p) for t, n in zip(table.tables, table.row_tokens))))
  else:
    page, slot = _page_slots(table, new_BTKH.shape[1], p)
  new_KBTH = jnp.moveaxis(new_BTKH, 2, 0).astype(pages_KNPH.dtype)
  return pages_KNPH.at[:, page, slot].set(new_KBTH)


@flax.struct.dataclass
class PackedTables:
  """Groups of rows with different query lengths in one forward: the forward's tokens are a
  single row [1, N] holding group g's R_g rows of T_g tokens each (row-major), one group after
  another, N = sum R_g * T_g. The dense layers take the N tokens at once, so one step of a
  serving engine reads the weights once for prefill chunks and decode rows alike; attention
  splits them back into each group's [R_g, T_g] rows and reads the pages of group g's table
  (lengths: tokens each row held before the forward)."""
  tables: tuple[PageTable, ...]
  row_tokens: tuple[int, ...] = flax.struct.field(pytree_node=False)  # T_g per group

  def split(self, x_1N) -> list[jax.Array]:
    """[1, N, ...] -> each group's [R_g, T_g, ...]."""
    out, at = [], 0
    for table, t in zip(self.tables, self.row_tokens):
      r = table.lengths.shape[0]
      out.append(x_1N[0, at:at + r * t].reshape(r, t, *x_1N.shape[2:]))
      at += r * t
    return out

  def join(self, xs: Sequence[jax.Array]) -> jax.Array:
    """Each group's [R_g, T_g, ...] -> [1, N, ...]."""
    return jnp.concatenate([x.reshape(-1, *x.shape[2:]) for x in xs])[None]

  def positions(self) -> jax.Array:
    """int32[1, N]: each token's position, its row's length + its index in the row."""
    return self.join([table.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
                      for table, t in zip(self.tables, self.row_tokens)])


@flax.struct.dataclass
class PackedPagedKVCache:
  """A page pool (as PagedKVCache's) written and read by packed groups of rows
  (`PackedTables`). The forward returns it with its pools updated and its tables as they were:
  whoever packed the rows keeps their lengths."""
  k_pages: jax.Array
  v_pages: jax.Array
  tables: PackedTables
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None
