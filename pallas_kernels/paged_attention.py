"""PagedAttention (Kwon et al. 2023) for decoding: new tokens against a paged KV cache.

  o = paged_attention(q, k_pages, v_pages, lengths, page_indices, sliding_window=None,
                      softcap=None, k_scales=None, v_scales=None)

q [B, Hq, D] (one new token per sequence) or [B, Tq, Hq, D] (several: speculative verification,
chunked prefill); k_pages, v_pages [Hkv, num_pages, page_size, D] (the shared page pool);
lengths int32[B], tokens in the cache including the Tq new ones; page_indices int32[B, P_seq],
the page table: position p of sequence b lives in slot p % page_size of physical page
page_indices[b, p // page_size]. Query t of row b sits at position lengths[b] - Tq + t and sees
positions <= its own (causal among the new tokens) and, with a sliding_window (Mistral, Gemma 2),
only the last sliding_window of them: key j is visible to query position i iff j <= i and
i - j < sliding_window, as in `flash_attention`. softcap (Gemma 2) bends the scaled scores to
softcap * tanh(s / softcap) before the mask and the softmax.

An int8 cache (model/kv_cache.py) passes int8 pages and their scales, k_scales, v_scales f32
[Hkv, num_pages, page_size]: slot j of a page holds x = codes[j] * scale[j]. The kernels read
the codes (half of bf16's bytes), take q.codes on the MXU / tensor cores in q's dtype (the codes
are exact there), multiply each score column by its K scale, and each probability column by its
V scale before the p.v product: no dequantized page is ever formed. On TPU a page's scales come
as a [1, page_size] row (lanes along the page's slots), the orientation of the score columns;
XLA lays the pool out for that before the call (a copy of the scales, 4 bytes per slot and head,
against the 2 * head_dim bytes of codes the kernel reads per slot).

A program handles a (sequence, KV head) pair and a block of the G * Tq query rows that read
that head (row t * G + g: query head g of the group at new token t), so each page is read once
per KV head and row block (GQA without repeating K/V). Decoding and speculative verification fit
one row block; a prefill chunk of hundreds of tokens spans several, which bounds the
accumulators a program holds (f32 [rows, D] in registers on GPU, in VMEM on TPU). Pages at or
past the last position a row block can see are never read, nor, with a sliding window, pages
wholly before the first one it can see: a block's sweep starts at its window's first page, so
the TPU grid and the GPU loop are as long as the window, not the page table. Long contexts can
be split over pages (flash-decoding, Dao et al. 2023): each split emits a partial output and
its log-sum-exp, and `_combine` merges them.

TPU (Mosaic): the page table and lengths are scalar-prefetched into SMEM
(`pltpu.PrefetchScalarGridSpec`); each grid step reads `pages_per_compute_block` pages through
block specs whose index maps look pages up in the table, clamped to the last valid page so steps
past the length issue no new DMA (and `pl.when` skips their compute).
GPU (Triton): one program per (sequence, KV head, split, row block) loops over its valid pages,
loading each through the table. head_dim and page_size must be powers of two (head_dim >= 16);
other shapes run the XLA reference on GPU (`paths.attention_path` says so).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _flash_common as fc
from pallas_kernels.flash_attention import soft_cap
from pallas_kernels.paths import attention_path, dispatch

LANES = 128
SUBLANES = 8
GPU_MIN_ROWS = 16  # tl.dot needs >= 16 rows
# Query rows per program. GPU: the f32 [rows, D] accumulator lives in registers, so rows * D is
# bounded (8192: 64 registers a thread at 4 warps); one row block of next_pow2(G * Tq) rows
# asked 1 MiB of shared memory for a 512-token chunk with G = 8. TPU: m, l and the accumulator
# are VMEM scratch, [512, 128 + 128 + D] f32, well inside the scoped VMEM of every generation.
GPU_ROW_ELEMENTS = 8192
TPU_MAX_ROWS = 512


# ---------------------------------------------------------------------------------- reference


def _as_4d(q):
  return (q[:, None], True) if q.ndim == 3 else (q, False)


def gather_pages(pages, page_indices):
  """[Hkv, num_pages, P, D] pool + [B, P_seq] table -> contiguous [B, P_seq * P, Hkv, D]."""
  hkv, _, page_size, d = pages.shape
  b, pps = page_indices.shape
  x = pages[:, page_indices]  # [Hkv, B, P_seq, P, D]
  return x.reshape(hkv, b, pps * page_size, d).transpose(1, 2, 0, 3)


def paged_attention_reference(q, k_pages, v_pages, lengths, page_indices, k_scales=None,
                              v_scales=None, *, scale=None, sliding_window=None, softcap=None):
  """Plain jnp: gather each sequence's pages (dequantized: codes * scales), then dense causal
  attention in f32.

  Arguments as `paged_attention`'s; slots no query can see (past the length, or before the
  first query's window) are zeroed first, so stale pages may hold anything, NaN included.
  """
  q4, single = _as_4d(q)
  b, tq, hq, d = q4.shape
  hkv = k_pages.shape[0]
  scale = d ** -0.5 if scale is None else scale
  k = gather_pages(k_pages, page_indices).astype(jnp.float32)
  v = gather_pages(v_pages, page_indices).astype(jnp.float32)
  if k_scales is not None:  # [Hkv, pages, P] -> [B, S, Hkv, 1], gathered as the pages are
    k = k * gather_pages(k_scales[..., None], page_indices)
    v = v * gather_pages(v_scales[..., None], page_indices)
  s = k.shape[1]
  # Slots at or past the length hold stale data (maybe NaN): zero them so 0 * NaN never occurs.
  # So may slots before the earliest window, whose pages a server may have recycled.
  valid = jnp.arange(s)[None, :] < lengths[:, None]
  if sliding_window is not None:
    valid &= jnp.arange(s)[None, :] > lengths[:, None] - tq - sliding_window
  valid = valid[:, :, None, None]
  k, v = jnp.where(valid, k, 0.0), jnp.where(valid, v, 0.0)
  pos = lengths[:, None] - tq + jnp.arange(tq)[None, :]  # [B, Tq]
  mask = jnp.arange(s)[None, None, :] <= pos[:, :, None]  # [B, Tq, S]
  if sliding_window is not None:
    mask &= pos[:, :, None] - jnp.arange(s)[None, None, :] < sliding_window
  qg = q4.astype(jnp.float32).reshape(b, tq, hkv, hq // hkv, d)
  logits = soft_cap(jnp.einsum("BTKGH,BSKH->BKGTS", qg, k) * scale, softcap)
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", p / jnp.where(l == 0, 1.0, l), v)
  o = o.reshape(b, tq, hq, d).astype(q.dtype)
  return o[:, 0] if single else o


# ------------------------------------------------------------------------------ shared pieces


def _group_queries(q4, hkv, rows):
  """[B, Tq, Hq, D] -> [B, Hkv, rows, D]; row r = t * G + g (padded rows are zeros).

  Token-major rows put the earliest new tokens in the first row blocks, which see the fewest
  pages (`_visible`)."""
  b, tq, hq, d = q4.shape
  x = q4.reshape(b, tq, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)
  x = x.reshape(b, hkv, tq * (hq // hkv), d)
  return fc.pad_axis(x, 2, rows)


def _rows_back(tq, g, rows):
  """How many positions before the newest token each row's query sits (int32 [rows])."""
  back = np.zeros(rows, np.int32)
  back[:tq * g] = tq - 1 - np.arange(tq * g) // g
  return back


def _visible(length, block, *, rows_per_block, tq, g):
  """Tokens row block `block` can see: up to the position of its last token's query."""
  last_t = fc.idiv(fc.imin((block + 1) * rows_per_block, tq * g) - 1, g)
  return length - (tq - 1 - last_t)


def _window_start(length, block, *, rows_per_block, tq, g, window):
  """The first position row block `block` can see (0 without a window): its first token's
  query position - window + 1; every earlier slot is masked for all of its rows."""
  if window is None:
    return 0
  first_t = fc.idiv(block * rows_per_block, g)
  return fc.imax(length - tq + first_t - window + 1, 0)


def _window_pages(*, rows_per_block, tq, g, window, page_size, pps):
  """The most pages one row block's positions can span: its window plus its tokens' spread
  (a static bound, so the grid or loop is as long as the window rather than the page table)."""
  if window is None:
    return pps
  tokens = min(tq, (rows_per_block - 1) // g + 2)  # a block of rows touches at most these
  span = window + tokens - 1  # positions from the first token's window to the last token
  return min(pps, -(-(span - 1) // page_size) + 1)  # + 1: the span need not start a page


def _ungroup(o, b, tq, hq, d):
  hkv = o.shape[1]
  o = o[:, :, :(hq // hkv) * tq].reshape(b, hkv, tq, hq // hkv, d)
  return o.transpose(0, 2, 1, 3, 4).reshape(b, tq, hq, d)


def _combine(o_part, lse_part):
  """Merge per-split results: o = sum_s exp(L_s - L) o_s with L = logsumexp_s L_s.

  o_part [B, Hkv, n, R, D] (each normalised), lse_part [B, Hkv, n, R] (-inf for empty splits).
  """
  if o_part.shape[2] == 1:
    return o_part[:, :, 0]
  m = jnp.max(lse_part, axis=2, keepdims=True)
  w = jnp.exp(lse_part - jnp.where(jnp.isfinite(m), m, 0.0))
  den = jnp.sum(w, axis=2)
  o = jnp.sum(w[..., None] * o_part, axis=2)
  return o / jnp.where(den == 0, 1.0, den)[..., None]


# ------------------------------------------------------------------------------------- TPU


def logical_page(length, step, j, *, page_size, ppcb, pps, start=None):
  """The page (index into the row's page table) that input j reads at grid step `step`.

  Steps count from the page holding position `start` (a sliding window's first visible
  position; None: page 0). Steps past the length are clamped to the last step that holds
  tokens, and inputs past the last valid page to that page, so the index map repeats the
  previous block and Mosaic issues no new DMA; the kernel skips their compute. Only pages
  holding tokens, and none wholly before `start`, are ever named (page 0 for an empty sequence).
  """
  n_valid = fc.imin(fc.imax(fc.idiv(length + page_size - 1, page_size), 1), pps)
  if start is None:
    step = fc.imin(step, fc.idiv(n_valid - 1, ppcb))
    return fc.imin(step * ppcb + j, n_valid - 1)
  first = fc.imin(fc.idiv(start, page_size), n_valid - 1)
  step = fc.imin(step, fc.idiv(n_valid - 1 - first, ppcb))
  return fc.imin(first + step * ppcb + j, n_valid - 1)


def _sees(k_pos, q_pos, window):
  """Key positions visible from query positions: causal, and within the window if any."""
  mask = k_pos <= q_pos
  return mask if window is None else mask & (q_pos - k_pos < window)


def _readable(pos, length, start):
  """Slots a row block may use: before the length and, with a window, from its first visible
  position `start`. Others may hold stale data, maybe NaN (and 0 * NaN would spread)."""
  ok = pos < length
  return ok if start is None else ok & (pos >= start)


def _tpu_kernel(lengths_ref, pages_ref, back_ref, q_ref, *refs, scale, softcap, window,
                page_size, ppcb, steps, visible, window_start, quantized):
  """One step: `ppcb` pages of one (sequence, KV head, row block, split); FlashAttention-2 Alg. 1
  update. quantized: int8 pages, followed by their K and V scale rows ([1, P] each)."""
  n_in = (4 if quantized else 2) * ppcb
  k_refs, v_refs = refs[:ppcb], refs[ppcb:2 * ppcb]
  ks_refs, vs_refs = refs[2 * ppcb:3 * ppcb], refs[3 * ppcb:n_in]
  o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[n_in:]
  b, block, split, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  length = lengths_ref[b]
  first = (split * steps + i) * ppcb  # first logical page of this step
  start = None
  if window is not None:  # steps count from the window's first page (`logical_page`)
    start = window_start(length, block)
    first = first + fc.idiv(start, page_size)

  @pl.when(i == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(first * page_size < visible(length, block))  # pages no row sees: no compute
  def _step():
    # Join the pages into one [ppcb * P, D] block; via f32 so any page size joins on whole tiles.
    def join(rs):
      return jnp.concatenate([r[...].astype(jnp.float32) for r in rs], axis=0)

    k, v = join(k_refs).astype(q_ref.dtype), join(v_refs)
    s = fc.dot(q_ref[...], k, fc.NT_DIMS)
    v_scale = None
    if quantized:  # the pages' scales as [1, ppcb * P] rows: one per score column
      row = lambda rs: jnp.concatenate([r[...] for r in rs], axis=1)
      s = s * row(ks_refs)
      col = first * page_size + lax.broadcasted_iota(jnp.int32, (1, s.shape[1]), 1)
      v_scale = jnp.where(_readable(col, length, start), row(vs_refs), 0.0)
    s, _ = fc.capped_scores(s * scale, softcap)
    k_pos = first * page_size + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    q_pos = length - 1 - fc.widen(back_ref[...], s.shape[1])
    v_pos = first * page_size + lax.broadcasted_iota(jnp.int32, v.shape, 0)
    v = jnp.where(_readable(v_pos, length, start), v, 0.0).astype(q_ref.dtype)
    m, l, acc = fc.online_softmax_step(s, _sees(k_pos, q_pos, window), m_sc[...], l_sc[...],
                                       acc_sc[...], v, v_scale=v_scale)
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(i == steps - 1)
  def _finish():
    o, lse = fc.finish_softmax(m_sc[...], l_sc[...], acc_sc[...], empty_lse=-jnp.inf)
    o_ref[...] = o
    lse_ref[...] = lse


def _paged_tpu(q4, k_pages, v_pages, lengths, page_indices, k_scales=None, v_scales=None, *,
               scale, softcap, window, ppcb, num_splits, max_rows, interpret):
  b, tq, hq, d = q4.shape
  hkv, _, page_size, _ = k_pages.shape
  pps = page_indices.shape[1]
  g = hq // hkv
  # Equal blocks of whole bf16 tiles (16 rows) when there are several, so little is padding.
  n_blocks = -(-g * tq // (max_rows or TPU_MAX_ROWS))
  block_rows = fc.round_up(-(-g * tq // n_blocks), SUBLANES if n_blocks == 1 else 2 * SUBLANES)
  rows = n_blocks * block_rows
  qs = _group_queries(q4, hkv, rows)
  back = jnp.broadcast_to(jnp.asarray(_rows_back(tq, g, rows))[:, None], (rows, LANES))
  visible = functools.partial(_visible, rows_per_block=block_rows, tq=tq, g=g)
  window_start = functools.partial(_window_start, rows_per_block=block_rows, tq=tq, g=g,
                                   window=window)
  span = _window_pages(rows_per_block=block_rows, tq=tq, g=g, window=window,
                       page_size=page_size, pps=pps)
  ppcb = ppcb or max(1, min(span, 256 // page_size))
  total_steps = -(-span // ppcb)
  num_splits = num_splits or (min(2, total_steps) if b * hkv * n_blocks == 1 else 1)
  steps = -(-total_steps // num_splits)

  def page_index(j):
    def index_map(bi, h, block, split, i, lengths_ref, pages_ref):
      length = lengths_ref[bi]
      start = None if window is None else window_start(length, block)
      page = logical_page(visible(length, block), split * steps + i, j, page_size=page_size,
                          ppcb=ppcb, pps=pps, start=start)
      return h, pages_ref[bi * pps + page], 0, 0
    return index_map

  page_specs = [pl.BlockSpec((None, None, page_size, d), page_index(j)) for j in range(ppcb)]
  quantized = k_scales is not None
  scales = ()
  if quantized:  # a page's scales as one [1, P] block: Mosaic blocks end in whole dims
    scales = (k_scales.reshape(hkv, -1, 1, page_size),) * ppcb + (
        v_scales.reshape(hkv, -1, 1, page_size),) * ppcb
    scale_specs = [pl.BlockSpec((None, None, 1, page_size), page_index(j)) for j in range(ppcb)]
    page_specs_in = [*page_specs, *page_specs, *scale_specs, *scale_specs]
  else:
    page_specs_in = [*page_specs, *page_specs]
  part_spec = lambda w: pl.BlockSpec((None, None, None, block_rows, w),
                                     lambda bi, h, block, split, i, *_: (bi, h, split, block, 0))
  kernel = functools.partial(_tpu_kernel, scale=scale, softcap=softcap, window=window,
                             page_size=page_size, ppcb=ppcb, steps=steps, visible=visible,
                             window_start=window_start, quantized=quantized)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, hkv, n_blocks, num_splits, steps),
          in_specs=[pl.BlockSpec((block_rows, LANES), lambda bi, h, block, *_: (block, 0)),
                    pl.BlockSpec((None, None, block_rows, d),
                                 lambda bi, h, block, *_: (bi, h, block, 0)),
                    *page_specs_in],
          out_specs=[part_spec(d), part_spec(LANES)],
          scratch_shapes=[pltpu.VMEM((block_rows, LANES), jnp.float32),
                          pltpu.VMEM((block_rows, LANES), jnp.float32),
                          pltpu.VMEM((block_rows, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, num_splits, rows, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="paged_attention",
  )(lengths, page_indices.reshape(-1), back, qs, *([k_pages] * ppcb), *([v_pages] * ppcb),
    *scales)
  return _ungroup(_combine(o, lse[..., 0]), b, tq, hq, d).astype(q4.dtype)


# ------------------------------------------------------------------------------------- GPU


def _broadcast_dot(a, b, dims, precision=None):
  """a @ b (NN) or a @ b.T (NT) as multiply-and-sum, for pages too short for tl.dot (< 16)."""
  del precision
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  if dims == fc.NT_DIMS:
    return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)
  return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def _gpu_kernel(lengths_ref, pages_ref, back_ref, q_ref, k_ref, v_ref, *refs, scale, softcap,
                window, page_size, pages_per_split, pps, precision, visible, window_start,
                quantized):
  """One (sequence, KV head, split, row block): loop over the split's pages its rows can see.
  quantized: int8 pages; refs start with their K and V scales ([num_pages, P] each)."""
  ks_ref, vs_ref, o_ref, lse_ref = refs if quantized else (None, None, *refs)
  matmul = fc.dot if page_size >= GPU_MIN_ROWS else _broadcast_dot
  b, split, block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = lengths_ref[b]
  n_valid = jnp.minimum(lax.div(visible(length, block) + page_size - 1, page_size), pps)
  lo = split * pages_per_split
  start = None
  if window is not None:  # the splits share out the pages from the window's first one
    start = window_start(length, block)
    lo = lo + fc.idiv(start, page_size)
  hi = jnp.minimum(lo + pages_per_split, n_valid)  # pages no row sees are never read
  q = q_ref[...]
  q_pos = (length - 1 - back_ref[...])[:, None]

  def body(lp, carry):
    page = pages_ref[lp]
    k, v = k_ref[page], v_ref[page]
    v_scale = None
    if quantized:  # codes in q's dtype (exact); scales per score / probability column
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = matmul(q, k, fc.NT_DIMS, precision)
    if quantized:
      s = s * ks_ref[page][None, :]
      col = lp * page_size + lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
      v_scale = jnp.where(_readable(col, length, start), vs_ref[page][None, :], 0.0)
    s, _ = fc.capped_scores(s * scale, softcap)
    k_pos = lp * page_size + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    v_pos = lp * page_size + lax.broadcasted_iota(jnp.int32, v.shape, 0)
    v = jnp.where(_readable(v_pos, length, start), v, jnp.zeros_like(v))
    return fc.online_softmax_step(s, _sees(k_pos, q_pos, window), *carry, v, precision, matmul,
                                  v_scale=v_scale)

  rows = q.shape[0]
  init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  o, lse = fc.finish_softmax(*lax.fori_loop(lo, hi, body, init), empty_lse=-jnp.inf)
  o_ref[...] = o
  lse_ref[...] = lse.reshape(rows)


def _paged_gpu(q4, k_pages, v_pages, lengths, page_indices, k_scales=None, v_scales=None, *,
               scale, softcap, window, num_splits, max_rows, interpret):
  b, tq, hq, d = q4.shape
  hkv, num_pages, page_size, _ = k_pages.shape
  pps = page_indices.shape[1]
  path = attention_path("cuda", head_dim=d, dtype=q4.dtype, page_size=page_size, impl="pallas")
  if path.impl == "xla":
    # Raising instead would break lowering for TPU: platform_dependent traces every branch.
    return paged_attention_reference(q4, k_pages, v_pages, lengths, page_indices, k_scales,
                                     v_scales, scale=scale, sliding_window=window,
                                     softcap=softcap)
  g = hq // hkv
  block_rows = min(fc.next_pow2(max(g * tq, GPU_MIN_ROWS)),
                   max_rows or max(GPU_MIN_ROWS, GPU_ROW_ELEMENTS // d))
  rows = fc.round_up(g * tq, block_rows)
  n_blocks = rows // block_rows
  qs = _group_queries(q4, hkv, rows)
  back = jnp.asarray(_rows_back(tq, g, rows))
  span = _window_pages(rows_per_block=block_rows, tq=tq, g=g, window=window,
                       page_size=page_size, pps=pps)
  # Flash-decoding split: enough programs to fill the GPU, but >= 8 pages per split.
  num_splits = num_splits or int(np.clip(-(-256 // (b * hkv * n_blocks)), 1, -(-span // 8)))
  pages_per_split = -(-span // num_splits)
  pool_spec = pl.BlockSpec((None, num_pages, page_size, d), lambda bi, h, s, r: (h, 0, 0, 0))
  quantized = k_scales is not None
  scales = () if not quantized else (k_scales, v_scales)
  scale_specs = [pl.BlockSpec((None, num_pages, page_size), lambda bi, h, s, r: (h, 0, 0))] * len(
      scales)
  kernel = functools.partial(
      _gpu_kernel, quantized=quantized, scale=scale, softcap=softcap, window=window,
      page_size=page_size,
      pages_per_split=pages_per_split, pps=pps,
      precision=lax.Precision.HIGHEST if q4.dtype == jnp.float32 else None,
      visible=functools.partial(_visible, rows_per_block=block_rows, tq=tq, g=g),
      window_start=functools.partial(_window_start, rows_per_block=block_rows, tq=tq, g=g,
                                     window=window))
  o, lse = pl.pallas_call(
      kernel,
      grid=(b, hkv, num_splits, n_blocks),
      in_specs=[pl.BlockSpec((b,), lambda *_: (0,)),
                pl.BlockSpec((None, pps), lambda bi, h, s, r: (bi, 0)),
                pl.BlockSpec((block_rows,), lambda bi, h, s, r: (r,)),
                pl.BlockSpec((None, None, block_rows, d), lambda bi, h, s, r: (bi, h, r, 0)),
                pool_spec, pool_spec, *scale_specs],
      out_specs=[pl.BlockSpec((None, None, None, block_rows, d),
                              lambda bi, h, s, r: (bi, h, s, r, 0)),
                 pl.BlockSpec((None, None, None, block_rows), lambda bi, h, s, r: (bi, h, s, r))],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, num_splits, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=bool(interpret),  # TPU interpret params mean plain interpret here
      name="paged_attention",
  )(lengths, page_indices, back, qs, k_pages, v_pages, *scales)
  return _ungroup(_combine(o, lse), b, tq, hq, d).astype(q4.dtype)


# ---------------------------------------------------------------------------------- public


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "softcap", "impl",
                                             "pages_per_compute_block", "num_splits",
                                             "rows_per_block", "interpret", "backend"))
def paged_attention(q, k_pages, v_pages, lengths, page_indices, *, k_scales=None, v_scales=None,
                    scale=None, sliding_window=None, softcap=None, impl="auto",
                    pages_per_compute_block=None, num_splits=None, rows_per_block=None,
                    interpret=None, backend=None):
  """Attention of new tokens over a paged KV cache. Returns q's shape and dtype.

  q [B, Hq, D] or [B, Tq, Hq, D]; k_pages, v_pages [Hkv, num_pages, page_size, D];
  lengths int32[B] (cache tokens including the new ones); page_indices int32[B, pages_per_seq].
  k_scales, v_scales: f32 [Hkv, num_pages, page_size] with int8 pages (an int8 cache: slot j
    holds codes[j] * scales[j]); None otherwise.
  scale: softmax scale, default D ** -0.5.
  sliding_window: the query at position i sees key j only if i - j < sliding_window (and
    j <= i). Pages wholly before every query's window are never read, so their table entries
    may name recycled pages.
  softcap: if set (> 0), scores s = scale * q.k become softcap * tanh(s / softcap) before the
    mask and the softmax (Gemma 2).
  impl: "auto" (the kernel where `paths.attention_path` says it is compile-tested, else the XLA
    reference), "xla" or "pallas"; decided for the platform the program is lowered for.
  pages_per_compute_block: pages per TPU grid step (default: 256 tokens' worth).
  num_splits: flash-decoding splits over pages (default: by occupancy).
  rows_per_block: most query rows (G * Tq in all) per program, a power of two >= 16 (default:
    TPU_MAX_ROWS on TPU, GPU_ROW_ELEMENTS // D on GPU).
  interpret (impl="pallas"): run the kernel in the Pallas interpreter. None: only on platforms
    with no kernel (CPU). A `pltpu.InterpretParams` selects TPU interpret mode for the TPU
    variant.
  backend (impl="pallas"): force the "tpu" or "gpu" variant wherever lowered (default: by the
    platform being lowered; the TPU variant in interpret mode).
  """
  q4, single = _as_4d(q)
  b, tq, hq, d = q4.shape
  if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.shape[3] != d:
    raise ValueError(f"k_pages and v_pages must both be [Hkv, num_pages, page_size, D={d}]; "
                     f"got {k_pages.shape} and {v_pages.shape}")
  if hq % k_pages.shape[0]:
    raise ValueError(f"query heads Hq={hq} must be a multiple of KV heads Hkv={k_pages.shape[0]}")
  if lengths.shape != (b,) or page_indices.ndim != 2 or page_indices.shape[0] != b:
    raise ValueError(f"lengths must be [B={b}] and page_indices [B={b}, pages_per_seq]; got "
                     f"{lengths.shape} and {page_indices.shape}")
  if backend not in (None, "tpu", "gpu"):
    raise ValueError(f"backend must be 'tpu', 'gpu' or None, got {backend!r}")
  if rows_per_block is not None and (rows_per_block < GPU_MIN_ROWS
                                     or rows_per_block & (rows_per_block - 1)):
    raise ValueError(f"rows_per_block must be a power of two >= {GPU_MIN_ROWS} or None, got "
                     f"{rows_per_block}")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
  quantized = k_pages.dtype == jnp.int8
  if quantized != (k_scales is not None) or (k_scales is None) != (v_scales is None) or (
      quantized and not k_scales.shape == v_scales.shape == k_pages.shape[:3]):
    raise ValueError(f"int8 k_pages/v_pages need k_scales and v_scales, both "
                     f"[Hkv, num_pages, page_size] = {k_pages.shape[:3]}; other dtypes none. Got "
                     f"{k_pages.dtype} pages with scales {getattr(k_scales, 'shape', None)} and "
                     f"{getattr(v_scales, 'shape', None)}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be > 0 or None, got {softcap}")
  scale = float(d ** -0.5 if scale is None else scale)
  softcap = None if softcap is None else float(softcap)
  lengths, page_indices = lengths.astype(jnp.int32), page_indices.astype(jnp.int32)
  statics = dict(scale=scale, softcap=softcap, window=sliding_window, num_splits=num_splits,
                 max_rows=rows_per_block)

  def kernel(variant, interpret):
    if variant == "gpu":
      return functools.partial(_paged_gpu, interpret=interpret, **statics)
    return functools.partial(_paged_tpu, ppcb=pages_per_compute_block, interpret=interpret,
                             **statics)

  xla = functools.partial(paged_attention_reference, scale=scale, sliding_window=sliding_window,
                          softcap=softcap)
  scales = () if not quantized else (k_scales.astype(jnp.float32), v_scales.astype(jnp.float32))
  path_of = lambda platform: attention_path(platform, head_dim=d, dtype=q.dtype,
                                            kv_dtype=k_pages.dtype,
                                            page_size=k_pages.shape[2], impl=impl)
  o = dispatch((q4, k_pages, v_pages, lengths, page_indices, *scales), impl=impl,
               interpret=interpret, backend=backend, path_of=path_of, kernel=kernel, xla=xla)
  return o[:, 0] if single else o
