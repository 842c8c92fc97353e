"""FlashAttention-2 (Dao 2023) for GPU: Pallas kernels lowered to Triton.

Layout is the model's [B, T, H, D]; a block spec with the head axis squeezed reads one head's
[T, D] slab with a stride, so nothing is transposed. Each program owns one output block and loops
over the blocks it needs (FlashAttention-2, Alg. 1 and 2: the loop over the other sequence runs
inside the program), from the first to the last block that can hold a visible key, so fully
masked blocks are never loaded. GQA: K/V block specs read head h // G; the dK/dV program for a
KV head sums over its G query heads itself.

Triton wants power-of-two tensor sizes and at least 16 along each matmul dim, so sequences are
padded to whole blocks (masked) and head_dim to a power of two >= 16 (zeros; sliced off).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _flash_common as fc

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


class _Plan:
  """Static shapes and block sizes for one call (sizes fitted to the sequence lengths)."""

  def __init__(self, q, k, blocks):
    self.b, self.t, self.hq, self.d = q.shape
    self.s, self.hkv = k.shape[1], k.shape[2]
    self.g = self.hq // self.hkv
    self.d_pad = fc.next_pow2(max(self.d, MIN_BLOCK))
    qb = (blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv)
    kb = (blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv)
    (self.bq, self.bq_dq, self.bq_dkv), self.t_pad = fc.fit_blocks(self.t, qb, MIN_BLOCK)
    (self.bk, self.bk_dq, self.bk_dkv), self.s_pad = fc.fit_blocks(self.s, kb, MIN_BLOCK)
    # f32 inputs get IEEE f32 matmuls (Triton would otherwise use TF32).
    self.precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

  def pad(self, x, n):
    return fc.pad_axis(fc.pad_axis(x, 1, n), 3, self.d_pad)

  def pad_rows(self, stat, n):  # [B, T, H] -> [B, H, n]
    return jnp.swapaxes(fc.pad_axis(stat, 1, n), 1, 2)


def _params(num_warps, num_stages=2):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _warps(d_pad, b1, b2):
  return 4 if d_pad <= 64 and b1 * b2 <= 64 * 64 else 8


def _mask(q_pos, k_pos, q_ids, k_ids, *, causal, window, kv_len, kv_pad):
  return fc.visible(q_pos, k_pos, q_ids, k_ids, causal=causal, window=window, kv_len=kv_len,
                    kv_pad=kv_pad)


# ------------------------------------------------------------------------------------ forward


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, softcap,
                causal, window, kv_len, kv_pad, bq, bk, nk, precision):
  """One query block of FlashAttention-2, Alg. 1: loop over the KV blocks it can see."""
  iq = pl.program_id(0)
  lo, hi = fc.kv_block_range(iq, bq=bq, bk=bk, nk=nk, causal=causal, window=window)
  q = q_ref[...]
  use_mask = fc.needs_mask(causal=causal, window=window, has_segments=qseg_ref is not None,
                           kv_len=kv_len, kv_pad=kv_pad)
  q_pos = iq * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  q_ids = None if qseg_ref is None else qseg_ref[...][:, None]

  def body(ik, carry):
    start = pl.multiple_of(ik * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    s, _ = fc.capped_scores(fc.dot(q, k, fc.NT_DIMS, precision) * scale, softcap)
    mask = None
    if use_mask:
      k_pos = ik * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      k_ids = None if kseg_ref is None else kseg_ref[pl.ds(start, bk)][None, :]
      mask = _mask(q_pos, k_pos, q_ids, k_ids, causal=causal, window=window, kv_len=kv_len,
                   kv_pad=kv_pad)
    return fc.online_softmax_step(s, mask, *carry, v_ref[pl.ds(start, bk), :], precision)

  init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, q.shape[-1]), jnp.float32))
  o, lse = fc.finish_softmax(*lax.fori_loop(lo, hi + 1, body, init))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(bq)


def forward(q, k, v, q_seg, kv_seg, *, causal, window, scale, softcap, blocks, interpret):
  """q [B,T,Hq,D], k/v [B,S,Hkv,D], segment ids int32 [B,T]/[B,S] or None.

  Returns o [B,T,Hq,D] and the log-sum-exp L [B,Hq,T] in f32.
  """
  p = _Plan(q, k, blocks)
  bq, bk = p.bq, p.bk
  nq, nk = p.t_pad // bq, p.s_pad // bk
  q_spec = pl.BlockSpec((None, bq, None, p.d_pad), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, p.s_pad, None, p.d_pad),
                         lambda i, b, h: (b, 0, fc.idiv(h, p.g), 0))
  seg_specs = [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
               pl.BlockSpec((None, p.s_pad), lambda i, b, h: (b, 0))]
  kernel = functools.partial(_fwd_kernel, scale=scale, softcap=softcap, causal=causal,
                             window=window, kv_len=p.s, kv_pad=p.s_pad, bq=bq, bk=bk, nk=nk,
                             precision=p.precision)
  has_seg = q_seg is not None
  o, lse = pl.pallas_call(
      kernel,
      grid=(nq, p.b, p.hq),
      in_specs=[q_spec, kv_spec, kv_spec] + (seg_specs if has_seg else [None, None]),
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct((p.b, p.t_pad, p.hq, p.d_pad), q.dtype),
                 jax.ShapeDtypeStruct((p.b, p.hq, p.t_pad), jnp.float32)],
      compiler_params=_params(_warps(p.d_pad, bq, bk)),
      interpret=bool(interpret),  # TPU interpret params mean plain interpret here
      name="flash_attention_fwd",
  )(p.pad(q, p.t_pad), p.pad(k, p.s_pad), p.pad(v, p.s_pad),
    fc.pad_axis(q_seg, 1, p.t_pad) if has_seg else None,
    fc.pad_axis(kv_seg, 1, p.s_pad) if has_seg else None)
  return o[:, :p.t, :, :p.d], lse[:, :, :p.t]


# ----------------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, do_ref, k_ref, v_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, *,
               scale, softcap, causal, window, kv_len, kv_pad, bq, bk, nk, precision):
  """dQ for one query block (FlashAttention-2, Alg. 2), looping over its KV blocks."""
  iq = pl.program_id(0)
  lo, hi = fc.kv_block_range(iq, bq=bq, bk=bk, nk=nk, causal=causal, window=window)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  use_mask = fc.needs_mask(causal=causal, window=window, has_segments=qseg_ref is not None,
                           kv_len=kv_len, kv_pad=kv_pad)
  q_pos = iq * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  q_ids = None if qseg_ref is None else qseg_ref[...][:, None]

  def body(ik, dq):
    start = pl.multiple_of(ik * bk, bk)
    mask = None
    if use_mask:
      k_pos = ik * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      k_ids = None if kseg_ref is None else kseg_ref[pl.ds(start, bk)][None, :]
      mask = _mask(q_pos, k_pos, q_ids, k_ids, causal=causal, window=window, kv_len=kv_len,
                   kv_pad=kv_pad)
    return dq + fc.dq_step(q, do, k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :], lse,
                           delta, mask, scale, precision, softcap)

  dq = lax.fori_loop(lo, hi + 1, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref,
                dv_ref, *, scale, softcap, causal, window, kv_len, kv_pad, bq, bk, nq, group,
                precision):
  """dK, dV for one KV block: loop over (query head of the group, query block) pairs.

  FlashAttention-2, Alg. 2 (outer loop over KV blocks), in the transposed form of `dkv_step`.
  """
  ik = pl.program_id(0)
  lo, hi = fc.q_block_range(ik, bq=bq, bk=bk, nq=nq, causal=causal, window=window)
  n = jnp.maximum(hi - lo + 1, 0)
  k, v = k_ref[...], v_ref[...]
  use_mask = fc.needs_mask(causal=causal, window=window, has_segments=qseg_ref is not None,
                           kv_len=kv_len, kv_pad=kv_pad)
  k_pos = ik * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
  k_ids = None if kseg_ref is None else kseg_ref[...][:, None]

  def body(idx, carry):
    g, iq = lax.div(idx, n), lo + lax.rem(idx, n)
    start = pl.multiple_of(iq * bq, bq)
    rows = pl.ds(start, bq)
    mask = None
    if use_mask:
      q_pos = iq * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
      q_ids = None if qseg_ref is None else qseg_ref[rows][None, :]
      mask = _mask(q_pos, k_pos, q_ids, k_ids, causal=causal, window=window, kv_len=kv_len,
                   kv_pad=kv_pad)
    dk, dv = fc.dkv_step(q_ref[rows, g, :], do_ref[rows, g, :], k, v,
                         lse_ref[g, rows][None, :], delta_ref[g, rows][None, :], mask, scale,
                         precision, softcap)
    return carry[0] + dk, carry[1] + dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group * n, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, o, lse, do, *, causal, window, scale, softcap, blocks,
             interpret):
  """Gradients of forward(); o and lse as forward returned them. Returns dq, dk, dv."""
  p = _Plan(q, k, blocks)
  qs, ks, vs, dos = p.pad(q, p.t_pad), p.pad(k, p.s_pad), p.pad(v, p.s_pad), p.pad(do, p.t_pad)
  # Padded query rows get L = +inf so their P is 0 (their dO is 0; inf * 0 would be NaN).
  lse = fc.pad_axis(lse, 2, p.t_pad, jnp.inf)
  delta = p.pad_rows(fc.softmax_delta(o, do), p.t_pad)
  has_seg = q_seg is not None
  q_seg = fc.pad_axis(q_seg, 1, p.t_pad) if has_seg else None
  kv_seg = fc.pad_axis(kv_seg, 1, p.s_pad) if has_seg else None
  common = dict(scale=scale, softcap=softcap, causal=causal, window=window, kv_len=p.s,
                kv_pad=p.s_pad, precision=p.precision)

  bq, bk = p.bq_dq, p.bk_dq
  q_spec = pl.BlockSpec((None, bq, None, p.d_pad), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, p.s_pad, None, p.d_pad),
                         lambda i, b, h: (b, 0, fc.idiv(h, p.g), 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  seg_specs = [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
               pl.BlockSpec((None, p.s_pad), lambda i, b, h: (b, 0))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, bq=bq, bk=bk, nk=p.s_pad // bk, **common),
      grid=(p.t_pad // bq, p.b, p.hq),
      in_specs=[q_spec, q_spec, kv_spec, kv_spec, row_spec, row_spec]
      + (seg_specs if has_seg else [None, None]),
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(qs.shape, q.dtype),
      compiler_params=_params(_warps(p.d_pad, bq, bk)),
      interpret=bool(interpret),  # TPU interpret params mean plain interpret here
      name="flash_attention_dq",
  )(qs, dos, ks, vs, lse, delta, q_seg, kv_seg)

  bq, bk = p.bq_dkv, p.bk_dkv
  kv_spec = pl.BlockSpec((None, bk, None, p.d_pad), lambda i, b, h: (b, i, h, 0))
  q_spec = pl.BlockSpec((None, p.t_pad, p.g, p.d_pad), lambda i, b, h: (b, 0, h, 0))
  row_spec = pl.BlockSpec((None, p.g, p.t_pad), lambda i, b, h: (b, h, 0))
  seg_specs = [pl.BlockSpec((None, p.t_pad), lambda i, b, h: (b, 0)),
               pl.BlockSpec((None, bk), lambda i, b, h: (b, i))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, bq=bq, bk=bk, nq=p.t_pad // bq, group=p.g, **common),
      grid=(p.s_pad // bk, p.b, p.hkv),
      in_specs=[kv_spec, kv_spec, q_spec, q_spec, row_spec, row_spec]
      + (seg_specs if has_seg else [None, None]),
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(ks.shape, k.dtype), jax.ShapeDtypeStruct(vs.shape, v.dtype)],
      compiler_params=_params(_warps(p.d_pad, bq, bk)),
      interpret=bool(interpret),  # TPU interpret params mean plain interpret here
      name="flash_attention_dkv",
  )(ks, vs, qs, dos, lse, delta, q_seg, kv_seg)
  return dq[:, :p.t, :, :p.d], dk[:, :p.s, :, :p.d], dv[:, :p.s, :, :p.d]
