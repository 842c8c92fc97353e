"""FlashAttention-2 (Dao 2023) for TPU: Pallas kernels lowered by Mosaic.

Layout inside: [B, H, T, D], so a block's last two dims are (sequence, head_dim) as Mosaic wants
(multiples of (8, 128) or the whole axis). The KV sweep is the innermost grid axis ("arbitrary");
running max, sum and output live in VMEM scratch between its steps. Index maps clamp that axis to
the range of blocks that can hold a visible key, so a skipped step maps to the block already in
VMEM and issues no DMA. GQA: the KV index map reads head h // G; nothing is repeated in HBM.

Per-row statistics are kept lane-dense: the forward's m, l and L as [bq, 128] (the same value in
every lane), the backward's L and D as rows [1, bq], segment ids as [bq, 128] columns or [8, bk]
rows. The dK/dV kernel works on S^T so those rows broadcast along sublanes without a transpose.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _flash_common as fc

LANES = 128
SUBLANES = 8


class _Plan:
  """Static shapes and block sizes for one call (sizes fitted to the sequence lengths)."""

  def __init__(self, q, k, blocks, interpret):
    self.b, self.t, self.hq, self.d = q.shape
    self.s, self.hkv = k.shape[1], k.shape[2]
    self.g = self.hq // self.hkv
    qb = (blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv)
    kb = (blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv)
    if not interpret:  # lane-dim blocks must be multiples of 128 unless they span the axis
      qb = tuple(max(x, LANES) for x in qb)
      kb = tuple(max(x, LANES) for x in kb)
    (self.bq, self.bq_dq, self.bq_dkv), self.t_pad = fc.fit_blocks(self.t, qb, SUBLANES)
    (self.bk, self.bk_dq, self.bk_dkv), self.s_pad = fc.fit_blocks(self.s, kb, SUBLANES)


def _to_bhtd(x, n):
  return jnp.swapaxes(fc.pad_axis(x, 1, n), 1, 2)


def _seg_cols(seg, n):  # [B, L] -> [B, n, 128]: one id per row, repeated across lanes
  seg = fc.pad_axis(seg, 1, n)
  return lax.broadcast_in_dim(seg, (seg.shape[0], n, LANES), (0, 1))


def _seg_rows(seg, n):  # [B, L] -> [B, 8, n]: ids along lanes, repeated across sublanes
  seg = fc.pad_axis(seg, 1, n)
  return lax.broadcast_in_dim(seg, (seg.shape[0], SUBLANES, n), (0, 2))


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


# ------------------------------------------------------------------------------------ forward


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                scale, softcap, causal, window, kv_len, kv_pad, bq, bk, nk):
  """One (query block, KV step) of FlashAttention-2, Alg. 1; the KV loop is the grid's last axis."""
  iq, j = pl.program_id(2), pl.program_id(3)
  lo, hi = fc.kv_block_range(iq, bq=bq, bk=bk, nk=nk, causal=causal, window=window)
  ik = lo + j

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(ik <= hi)  # blocks with no visible key are skipped, not computed
  def _step():
    s, _ = fc.capped_scores(fc.dot(q_ref[...], k_ref[...], fc.NT_DIMS) * scale, softcap)
    mask = None
    if fc.needs_mask(causal=causal, window=window, has_segments=qseg_ref is not None,
                     kv_len=kv_len, kv_pad=kv_pad):
      q_pos = iq * bq + lax.broadcasted_iota(jnp.int32, s.shape, 0)
      k_pos = ik * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
      q_ids = k_ids = None
      if qseg_ref is not None:
        q_ids, k_ids = fc.widen(qseg_ref[...], bk), kseg_ref[:1, :]
      mask = fc.visible(q_pos, k_pos, q_ids, k_ids, causal=causal, window=window,
                        kv_len=kv_len, kv_pad=kv_pad)
    m, l, acc = fc.online_softmax_step(s, mask, m_sc[...], l_sc[...], acc_sc[...], v_ref[...])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o, lse = fc.finish_softmax(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _segment_inputs(q_seg, kv_seg, p, bq, bk, kv_block):
  """(args, in_specs) of the segment ids for a grid (B, heads, query blocks, KV steps): query
  ids as lane-dense columns, KV ids as rows of the KV block that step j visits."""
  if q_seg is None:
    return [None, None], [None, None]
  return ([_seg_cols(q_seg, p.t_pad), _seg_rows(kv_seg, p.s_pad)],
          [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
           pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_block(i, j)))])


def forward(q, k, v, q_seg, kv_seg, *, causal, window, scale, softcap, blocks, interpret):
  """q [B,T,Hq,D], k/v [B,S,Hkv,D], segment ids int32 [B,T]/[B,S] or None.

  Returns o [B,T,Hq,D] and the log-sum-exp L [B,Hq,T] in f32.
  """
  p = _Plan(q, k, blocks, interpret)
  bq, bk = p.bq, p.bk
  nq, nk = p.t_pad // bq, p.s_pad // bk
  steps, kv_block = fc.kv_schedule(bq=bq, bk=bk, nq=nq, nk=nk, causal=causal, window=window)

  q_spec = pl.BlockSpec((None, None, bq, p.d), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, p.d),
                         lambda b, h, i, j: (b, fc.idiv(h, p.g), kv_block(i, j), 0))
  row_stat_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
  args = [_to_bhtd(q, p.t_pad), _to_bhtd(k, p.s_pad), _to_bhtd(v, p.s_pad)]
  in_specs = [q_spec, kv_spec, kv_spec]
  seg_args, seg_specs = _segment_inputs(q_seg, kv_seg, p, bq, bk, kv_block)
  args += seg_args
  in_specs += seg_specs
  kernel = functools.partial(_fwd_kernel, scale=scale, softcap=softcap, causal=causal,
                             window=window, kv_len=p.s, kv_pad=p.s_pad, bq=bq, bk=bk, nk=nk)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(p.b, p.hq, nq, steps),
          in_specs=in_specs,
          out_specs=[q_spec, row_stat_spec],
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, p.d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((p.b, p.hq, p.t_pad, p.d), q.dtype),
                 jax.ShapeDtypeStruct((p.b, p.hq, p.t_pad, LANES), jnp.float32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="flash_attention_fwd",
  )(*args)
  o = jnp.swapaxes(o, 1, 2)[:, :p.t]
  return o, lse[:, :, :p.t, 0]


# ----------------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, do_ref, k_ref, v_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref,
               dq_sc, *, scale, softcap, causal, window, kv_len, kv_pad, bq, bk, nk):
  """dQ for one query block, accumulated over the KV sweep (FlashAttention-2, Alg. 2)."""
  iq, j = pl.program_id(2), pl.program_id(3)
  lo, hi = fc.kv_block_range(iq, bq=bq, bk=bk, nk=nk, causal=causal, window=window)
  ik = lo + j

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(ik <= hi)
  def _step():
    shape = (bq, bk)
    mask = None
    if fc.needs_mask(causal=causal, window=window, has_segments=qseg_ref is not None,
                     kv_len=kv_len, kv_pad=kv_pad):
      q_pos = iq * bq + lax.broadcasted_iota(jnp.int32, shape, 0)
      k_pos = ik * bk + lax.broadcasted_iota(jnp.int32, shape, 1)
      q_ids = k_ids = None
      if qseg_ref is not None:
        q_ids, k_ids = fc.widen(qseg_ref[...], bk), kseg_ref[:1, :]
      mask = fc.visible(q_pos, k_pos, q_ids, k_ids, causal=causal, window=window,
                        kv_len=kv_len, kv_pad=kv_pad)
    lse = jnp.expand_dims(lse_ref[0], -1)  # row [1, bq] -> column [bq, 1]
    delta = jnp.expand_dims(delta_ref[0], -1)
    dq_sc[...] += fc.dq_step(q_ref[...], do_ref[...], k_ref[...], v_ref[...], lse, delta, mask,
                             scale, softcap=softcap)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref,
                dv_ref, dk_sc, dv_sc, *, scale, softcap, causal, window, kv_len, kv_pad, bq, bk,
                nq, q_steps):
  """dK, dV for one KV block, summed over the G query heads that share it and over query blocks.

  FlashAttention-2, Alg. 2 (outer loop over KV blocks, inner over query blocks): the last grid
  axis walks (group head, query block) pairs.
  """
  ik, s = pl.program_id(2), pl.program_id(3)
  lo, hi = fc.q_block_range(ik, bq=bq, bk=bk, nq=nq, causal=causal, window=window)
  iq = lo + lax.rem(s, q_steps)

  @pl.when(s == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(iq <= hi)
  def _step():
    shape = (bk, bq)  # transposed: keys along sublanes, queries along lanes
    mask = None
    if fc.needs_mask(causal=causal, window=window, has_segments=qseg_ref is not None,
                     kv_len=kv_len, kv_pad=kv_pad):
      k_pos = ik * bk + lax.broadcasted_iota(jnp.int32, shape, 0)
      q_pos = iq * bq + lax.broadcasted_iota(jnp.int32, shape, 1)
      q_ids = k_ids = None
      if qseg_ref is not None:
        q_ids, k_ids = qseg_ref[:1, :], fc.widen(kseg_ref[...], bq)
      mask = fc.visible(q_pos, k_pos, q_ids, k_ids, causal=causal, window=window,
                        kv_len=kv_len, kv_pad=kv_pad)
    dk, dv = fc.dkv_step(q_ref[...], do_ref[...], k_ref[...], v_ref[...], lse_ref[...],
                         delta_ref[...], mask, scale, softcap=softcap)
    dk_sc[...] += dk
    dv_sc[...] += dv

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, o, lse, do, *, causal, window, scale, softcap, blocks,
             interpret):
  """Gradients of forward(); o and lse as forward returned them. Returns dq, dk, dv."""
  p = _Plan(q, k, blocks, interpret)
  qs, ks, vs = _to_bhtd(q, p.t_pad), _to_bhtd(k, p.s_pad), _to_bhtd(v, p.s_pad)
  dos = _to_bhtd(do, p.t_pad)
  # L and D as rows [B, Hq, 1, T]: lane-dense, and what the transposed dK/dV step broadcasts.
  # Padded query rows get L = +inf so their P is 0 (their dO is 0; inf * 0 would be NaN).
  lse_rows = fc.pad_axis(lse, 2, p.t_pad, jnp.inf)[:, :, None, :]
  delta_rows = jnp.swapaxes(fc.pad_axis(fc.softmax_delta(o, do), 1, p.t_pad), 1, 2)[:, :, None]
  common = dict(scale=scale, softcap=softcap, causal=causal, window=window, kv_len=p.s,
                kv_pad=p.s_pad)

  # dQ: grid (B, Hq, query blocks, KV steps), as in the forward.
  bq, bk = p.bq_dq, p.bk_dq
  nq, nk = p.t_pad // bq, p.s_pad // bk
  kv_steps, kv_block = fc.kv_schedule(bq=bq, bk=bk, nq=nq, nk=nk, causal=causal,
                                      window=window)

  q_spec = pl.BlockSpec((None, None, bq, p.d), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, p.d),
                         lambda b, h, i, j: (b, fc.idiv(h, p.g), kv_block(i, j), 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i))
  args = [qs, dos, ks, vs, lse_rows, delta_rows]
  in_specs = [q_spec, q_spec, kv_spec, kv_spec, row_spec, row_spec]
  seg_args, seg_specs = _segment_inputs(q_seg, kv_seg, p, bq, bk, kv_block)
  args += seg_args
  in_specs += seg_specs
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, bq=bq, bk=bk, nk=nk, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(p.b, p.hq, nq, kv_steps),
          in_specs=in_specs,
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, p.d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(qs.shape, q.dtype),
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="flash_attention_dq",
  )(*args)

  # dK, dV: grid (B, Hkv, KV blocks, G * query steps); the group's heads are summed in VMEM.
  bq, bk = p.bq_dkv, p.bk_dkv
  nq, nk = p.t_pad // bq, p.s_pad // bk
  q_range = functools.partial(fc.q_block_range, bq=bq, bk=bk, nq=nq, causal=causal,
                              window=window)
  q_steps = fc.max_range_len(q_range, nk)

  def head(hk, s):
    return hk * p.g + fc.idiv(s, q_steps)

  def q_block(ik, s):
    lo, hi = q_range(ik)
    return fc.imin(lo + lax.rem(s, q_steps), hi)

  kv_spec = pl.BlockSpec((None, None, bk, p.d), lambda b, h, i, s: (b, h, i, 0))
  q_spec = pl.BlockSpec((None, None, bq, p.d),
                        lambda b, h, i, s: (b, head(h, s), q_block(i, s), 0))
  row_spec = pl.BlockSpec((None, None, 1, bq),
                          lambda b, h, i, s: (b, head(h, s), 0, q_block(i, s)))
  args = [ks, vs, qs, dos, lse_rows, delta_rows]
  in_specs = [kv_spec, kv_spec, q_spec, q_spec, row_spec, row_spec]
  if q_seg is None:
    args += [None, None]
    in_specs += [None, None]
  else:
    args += [_seg_rows(q_seg, p.t_pad), _seg_cols(kv_seg, p.s_pad)]
    in_specs += [pl.BlockSpec((None, SUBLANES, bq), lambda b, h, i, s: (b, 0, q_block(i, s))),
                 pl.BlockSpec((None, bk, LANES), lambda b, h, i, s: (b, i, 0))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, bq=bq, bk=bk, nq=nq, q_steps=q_steps, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(p.b, p.hkv, nk, p.g * q_steps),
          in_specs=in_specs,
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, p.d), jnp.float32),
                          pltpu.VMEM((bk, p.d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(ks.shape, k.dtype),
                 jax.ShapeDtypeStruct(vs.shape, v.dtype)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="flash_attention_dkv",
  )(*args)

  def back(x, n):
    return jnp.swapaxes(x, 1, 2)[:, :n]

  return back(dq, p.t), back(dk, p.s), back(dv, p.s)
