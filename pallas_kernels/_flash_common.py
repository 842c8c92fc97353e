"""Block math shared by the Mosaic (TPU) and Triton (GPU) FlashAttention kernels.

The two kernel variants differ only in how blocks reach the kernel (TPU: one KV block per grid
step, accumulators in VMEM scratch; GPU: a loop over KV blocks inside one program). The math of
one block, the mask and the ranges of blocks that can hold a visible key live here, once.

Masking convention: masked scores are -inf. A row that has seen no visible key yet has running
max -inf; we subtract 0 instead (`_finite_or_zero`) so exp(-inf - (-inf)) never makes a NaN, and
such a row ends with l = 0, acc = 0, output 0 and log-sum-exp +inf (so exp(s - lse) = 0 in the
backward pass). This is how fully masked rows give 0 rather than NaN.

Soft-capping (Gemma 2: Gemma Team 2024, Sec. 2) bends the scaled scores, s -> c tanh(s / c),
before the mask and the softmax; the backward pass multiplies dS by the derivative 1 - tanh^2.
With softcap None no cap op is traced, so programs without it are unchanged.
"""

import jax.numpy as jnp
from jax import lax

NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T without materialising the transpose
NN_DIMS = (((1,), (0,)), ((), ()))


def next_pow2(n):
  return 1 << max(int(n) - 1, 0).bit_length()


def round_up(n, m):
  return -(-n // m) * m


def fit_blocks(n, blocks, align):
  """Shrinks power-of-two block sizes for a short axis; returns (blocks, padded length).

  Every block is min(block, next_pow2(max(n, align))). All are powers of two, so the largest
  is a multiple of the others and padding n to it suits every kernel.
  """
  cap = next_pow2(max(n, align))
  fitted = tuple(min(b, cap) for b in blocks)
  return fitted, round_up(n, max(fitted))


def _is_static(*xs):
  return all(isinstance(x, int) for x in xs)


def imin(a, b):
  return min(a, b) if _is_static(a, b) else jnp.minimum(a, b)


def imax(a, b):
  return max(a, b) if _is_static(a, b) else jnp.maximum(a, b)


def idiv(a, b):
  """Floor division of non-negative integers; lax.div keeps index maps simple scalar ops."""
  return a // b if _is_static(a, b) else lax.div(a, b)


def kv_block_range(iq, *, bq, bk, nk, causal, window):
  """First and last KV block (inclusive) that can hold a key visible from query block iq.

  Blocks outside the range are fully masked and skipped (FlashAttention-2, Sec. 3.1.1: causal
  blocks above the diagonal are not computed). The range is empty when first > last.
  """
  first, last = 0, nk - 1
  if causal:  # key j <= query i <= iq*bq + bq - 1
    last = imin(last, idiv(iq * bq + bq - 1, bk))
  if window is not None:  # i - j < window, so j >= iq*bq - window + 1
    first = idiv(imax(iq * bq - window + 1, 0), bk)
  return first, last


def q_block_range(ik, *, bq, bk, nq, causal, window):
  """First and last query block (inclusive) that can see some key of KV block ik."""
  first, last = 0, nq - 1
  if causal:  # query i >= key j >= ik*bk
    first = idiv(ik * bk, bq)
  if window is not None:  # i < j + window <= ik*bk + bk - 1 + window
    last = imin(last, idiv(ik * bk + bk - 2 + window, bq))
  return first, last


def max_range_len(range_fn, n):
  """Largest number of blocks any of the n outer blocks visits (a static grid extent)."""
  return max(1, max(hi - lo + 1 for lo, hi in (range_fn(i) for i in range(n))))


def kv_schedule(*, bq, bk, nq, nk, causal, window):
  """(steps, kv_block): the static number of KV steps of a query block, and the KV block that
  step j of query block i visits. Past its range a block's steps stay on its last KV block, so
  the pipeline issues no new DMA for the skipped (fully masked) blocks."""
  def kv_block(i, j):
    lo, hi = kv_block_range(i, bq=bq, bk=bk, nk=nk, causal=causal, window=window)
    return imin(lo + j, hi)
  kv_range = lambda i: kv_block_range(i, bq=bq, bk=bk, nk=nk, causal=causal, window=window)
  return max_range_len(kv_range, nq), kv_block


def needs_mask(*, causal, window, has_segments, kv_len, kv_pad):
  return causal or window is not None or has_segments or kv_len != kv_pad


def visible(q_pos, k_pos, q_seg, k_seg, *, causal, window, kv_len, kv_pad):
  """Key j is visible to query i iff (not causal or j <= i) and i - j < window and same segment.

  Arguments broadcast against each other (either orientation); keys at or past kv_len are
  padding. Returns None when nothing is masked.
  """
  mask = None

  def both(a, b):
    return b if a is None else a & b

  if causal:
    mask = both(mask, k_pos <= q_pos)
  if window is not None:
    mask = both(mask, q_pos - k_pos < window)
  if kv_len != kv_pad:
    mask = both(mask, k_pos < kv_len)
  if q_seg is not None:
    mask = both(mask, q_seg == k_seg)
  return mask


def widen(x, n):
  """[r, w] -> [r, n] for a column held w times across lanes (w = 1 or 128)."""
  w = x.shape[-1]
  if w == n:
    return x
  if w == 1:
    return jnp.broadcast_to(x, (x.shape[0], n))
  if n < w:
    return x[:, :n]
  x = jnp.tile(x, (1, -(-n // w)))
  return x if x.shape[1] == n else x[:, :n]


def _finite_or_zero(m):
  return jnp.where(m == -jnp.inf, 0.0, m)


def dot(a, b, dims, precision=None):
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def capped_scores(s, softcap):
  """Scaled scores s -> (softcap * tanh(s / softcap), tanh(s / softcap)); (s, None) uncapped.

  The tanh is what the backward pass needs: d capped / d s = 1 - tanh^2.
  """
  if softcap is None:
    return s, None
  t = jnp.tanh(s * (1.0 / softcap))
  return t * softcap, t


def online_softmax_step(s, mask, m_prev, l_prev, acc_prev, v, precision=None, matmul=None,
                        v_scale=None):
  """One KV block of the inner loop of FlashAttention-2, Alg. 1 (online softmax).

  s [bq, bk] f32 scores; m_prev, l_prev [bq, w] running max and sum; acc_prev [bq, D] the
  unnormalised output. `matmul(a, b, dims, precision)` replaces `dot` if given. v_scale
  [1, bk] (int8 V: row j of V is v[j] * v_scale[j]) multiplies p in the p.v product only.
  Returns the updated (m, l, acc).
  """
  matmul = matmul or dot
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = _finite_or_zero(m_next)
  p = jnp.exp(s - widen(m_safe, s.shape[1]))
  alpha = jnp.exp(m_prev - m_safe)
  l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  pv = p if v_scale is None else p * v_scale
  acc = widen(alpha, acc_prev.shape[1]) * acc_prev + matmul(pv.astype(v.dtype), v, NN_DIMS,
                                                           precision)
  return m_next, l_next, acc


def finish_softmax(m, l, acc, empty_lse=float("inf")):
  """Normalise O by l once, at the end, and form L = m + log l (FlashAttention-2, Alg. 1).

  Rows without a visible key (l = 0) have acc = 0, so they output 0; their L is `empty_lse`
  (+inf for the backward pass, where exp(S - L) must be 0; -inf when partial results are
  combined by weight exp(L)).
  """
  empty = l == 0.0
  o = acc * widen(1.0 / jnp.where(empty, 1.0, l), acc.shape[1])
  lse = jnp.where(empty, empty_lse, m + jnp.log(jnp.where(empty, 1.0, l)))
  return o, lse


def dq_step(q, do, k, v, lse_col, delta_col, mask, scale, precision=None, softcap=None):
  """The dQ term dS K of one (query block, KV block) pair (FlashAttention-2, Alg. 2).

  lse_col, delta_col: [bq, 1] or lane-replicated [bq, 128]. Returns the unscaled dQ term; the
  softmax scale is applied once when the block's accumulation ends. With softcap, dS is taken
  back through the cap: dS_raw = dS (1 - tanh^2).
  """
  s, t = capped_scores(dot(q, k, NT_DIMS, precision) * scale, softcap)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  p = jnp.exp(s - widen(lse_col, s.shape[1]))  # P = exp(S - L), recomputed
  dp = dot(do, v, NT_DIMS, precision)
  ds = p * (dp - widen(delta_col, s.shape[1]))  # dS = P o (dP - D), D = rowsum(dO o O)
  if t is not None:
    ds = ds * (1.0 - t * t)
  return dot(ds.astype(k.dtype), k, NN_DIMS, precision)


def dkv_step(q, do, k, v, lse_row, delta_row, mask_t, scale, precision=None, softcap=None):
  """dV and dK terms for one pair, computed transposed ([bk, bq]) so L and D are rows.

  FlashAttention-2, Alg. 2: dV += P^T dO; dP = dO V^T; dS = P o (dP - D); dK += dS^T Q. Working
  with S^T = K Q^T gives P^T and dS^T directly, with L and D broadcast along sublanes.
  Returns (dk, dv) terms; dk is unscaled. softcap as in `dq_step`.
  """
  st, tt = capped_scores(dot(k, q, NT_DIMS, precision) * scale, softcap)
  if mask_t is not None:
    st = jnp.where(mask_t, st, -jnp.inf)
  pt = jnp.exp(st - lse_row)
  dv = dot(pt.astype(do.dtype), do, NN_DIMS, precision)
  dpt = dot(v, do, NT_DIMS, precision)
  dst = pt * (dpt - delta_row)
  if tt is not None:
    dst = dst * (1.0 - tt * tt)
  dk = dot(dst.astype(q.dtype), q, NN_DIMS, precision)
  return dk, dv


def pad_axis(x, axis, n, value=0):
  if x is None or x.shape[axis] == n:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def softmax_delta(o, do):
  """D = rowsum(dO o O) in f32, [B, T, H] (FlashAttention-2, Alg. 2)."""
  return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
