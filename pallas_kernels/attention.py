"""The one attention entry point the model calls.

Layout everywhere: q [B, T, Hq, D], k/v [B, S, Hkv, D], Hq % Hkv == 0.
`impl`: "auto" runs a Pallas kernel where it is compile-tested for the platform the program is
lowered for (`attention_path` says which, and why) and XLA elsewhere; "xla"; "pallas"
(interpreted on CPU). Self-attention goes to the FlashAttention-2 kernel (`flash_attention.py`);
attention over a contiguous cache stays in XLA (see `cached_attention`); a paged cache uses
`paged_attention`.
Every entry takes `softcap` (Gemma 2): scaled scores s become softcap * tanh(s / softcap) before
the mask and the softmax; None (the default) traces no cap at all.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import flash_attention, soft_cap
from pallas_kernels.paths import attention_path, check_impl, dispatch

__all__ = ["attention", "attention_path", "cached_attention"]

XLA_BLOCK_Q = 64  # query block of the XLA path; the Pallas kernels have their own BlockSizes


def _attend(q, k, v, mask, scale, *, softcap=None, rows_see_a_key=False, k_scales=None,
            v_scales=None):
  """Dense GQA attention. q [B,T,N,H], k/v [B,S,K,H], mask bool [B,T,S] -> [B,T,N,H].

  rows_see_a_key: the caller guarantees no fully masked row (self-attention, where every
  query sees itself), so the plain softmax applies: ~30% faster than the guarded one on CPU.
  k_scales, v_scales: f32 [B,S,K] for int8 k/v (x = codes * scale per token and head). The
  scale of key j multiplies score j after the dot, and that of value j probability j before
  the p.v dot: the same sums as over dequantized K/V, without forming them.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  q = q.reshape(b, t, kh, g, h)
  if k_scales is not None:  # int8 codes: exact in any float dtype
    k, v = k.astype(q.dtype), v.astype(q.dtype)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  if k_scales is not None:
    s = s * jnp.einsum("BSK->BKS", k_scales)[:, :, None, None, :]
  s = soft_cap(s * scale, softcap)
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  if rows_see_a_key:
    p = jax.nn.softmax(s, axis=-1)
  else:
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # fully masked rows give 0, not NaN
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
  if v_scales is not None:
    p = p * jnp.einsum("BSK->BKS", v_scales)[:, :, None, None, :]
  o = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(b, t, n, h).astype(q.dtype)


def attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None, scale=None,
              softcap=None, impl="auto", block_q=XLA_BLOCK_Q):
  """Self-attention over one sequence. q [B,T,Hq,D], k/v [B,T,Hkv,D], segment_ids int32[B,T].

  Key j is visible to query i iff (not causal or j <= i), i - j < sliding_window (if set) and
  segment_ids agree. Fully masked rows output 0. softcap: scores s -> softcap * tanh(s /
  softcap) after scaling, before the mask (Gemma 2). The path is `attention_path(platform,
  ...)`'s for the platform the program is lowered for.
  """
  xla = functools.partial(_blocked_attention, causal=causal, sliding_window=sliding_window,
                          scale=scale, softcap=softcap, block_q=block_q)

  def kernel(variant, interpret):
    return lambda q, k, v, seg: flash_attention(
        q, k, v, segment_ids=seg, causal=causal, sliding_window=sliding_window, scale=scale,
        softcap=softcap, impl="pallas", backend=variant, interpret=interpret)

  path_of = lambda platform: attention_path(platform, head_dim=q.shape[-1], dtype=q.dtype,
                                            kv_dtype=k.dtype, impl=impl)
  return dispatch((q, k, v, segment_ids), impl=impl, interpret=None, backend=None,
                  path_of=path_of, kernel=kernel, xla=xla)


def _blocked_attention(q, k, v, segment_ids, *, causal, sliding_window, scale, block_q,
                       softcap=None):
  """The XLA path: dense attention per block of queries, over only the keys the block can see.

  Causal (and windowed) blocks skip the keys that are masked for every query in the block, as
  FlashAttention does (Dao 2023, Sec. 3.1), which halves the work of causal attention; the
  Python loop unrolls into static shapes. On CPU this is ~2x faster than one dense pass.
  """
  t, s = q.shape[1], k.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if not causal or t != s:
    block_q = t
  block_q = max(block_q, -(-t // 16))  # at most 16 unrolled blocks, to bound compile time
  outs = []
  for q0 in range(0, t, block_q):
    q1 = min(q0 + block_q, t)
    k1 = q1 if causal else s  # keys past the block's last query are masked for all of it
    k0 = 0 if sliding_window is None else max(0, q0 - sliding_window + 1)
    qi = jnp.arange(q0, q1)[:, None]
    kj = jnp.arange(k0, k1)[None, :]
    mask = jnp.ones((q1 - q0, k1 - k0), bool)
    if causal:
      mask &= kj <= qi
    if sliding_window is not None:
      mask &= qi - kj < sliding_window
    mask = jnp.broadcast_to(mask, (q.shape[0], q1 - q0, k1 - k0))
    if segment_ids is not None:
      mask &= segment_ids[:, q0:q1, None] == segment_ids[:, None, k0:k1]
    # With T == S every query sees at least itself (its own position and segment).
    outs.append(_attend(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], mask, scale, softcap=softcap,
                        rows_see_a_key=t == s))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def cached_attention(q, k, v, lengths, *, sliding_window=None, scale=None, softcap=None,
                     impl="auto", k_scales=None, v_scales=None):
  """New tokens against a contiguous cache that already holds them.

  q [B,Tq,Hq,D]; k/v [B,S,Hkv,D]; lengths int32[B] counts the tokens in the cache including
  the Tq new ones, so query t of row b sits at slot lengths[b] - Tq + t; causal, and within
  sliding_window of the query if set. softcap as in `attention`. An int8 cache gives its
  scales, k_scales and v_scales f32 [B,S,Hkv] (k = codes * k_scales[..., None]).

  Every `impl` runs XLA here: the query offsets depend on runtime lengths, and for decoding
  (Tq small) this is a memory-bound pass over the cache that XLA already does well. Serving
  with a page pool should call `paged_attention`, which has Pallas kernels.
  """
  check_impl(impl)
  tq, s = q.shape[1], k.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  q_slot = lengths[:, None] - tq + jnp.arange(tq)[None, :]  # [B,Tq]
  kj = jnp.arange(s)[None, None, :]
  mask = kj <= q_slot[:, :, None]
  if sliding_window is not None:
    mask &= q_slot[:, :, None] - kj < sliding_window
  if (k_scales is None) != (v_scales is None) or (k_scales is not None and (
      k_scales.shape != k.shape[:3] or v_scales.shape != v.shape[:3])):
    raise ValueError(f"k_scales and v_scales must both be [B, S, Hkv] = {k.shape[:3]} or both "
                     f"None; got {getattr(k_scales, 'shape', None)} and "
                     f"{getattr(v_scales, 'shape', None)}")
  return _attend(q, k, v, mask, scale, softcap=softcap, k_scales=k_scales, v_scales=v_scales)
