"""FlashAttention kernels vs. their references, in Pallas interpret mode on CPU.

Interpret mode is slow to compile, so each case compiles once: a jitted function returns the
output and all three gradients, and the cases below are picked so that every length, head
layout, head dim, mask kind, dtype and block shape appears somewhere rather than in a full
product.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attention_oracle import dense_attention, position_mask
from pallas_kernels import _flash_common as fc
from pallas_kernels.attention import attention, cached_attention
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference

B64 = BlockSizes(64, 64, 64, 64, 64, 64)
B_MIXED = BlockSizes(block_q=64, block_k=128, block_q_dq=128, block_k_dq=64, block_q_dkv=64,
                     block_k_dkv=128)
B128 = BlockSizes(128, 128, 128, 128, 128, 128)
B256 = BlockSizes(256, 256, 256, 256, 256, 256)  # 384 = 1.5 blocks
# The TPU variant runs in TPU interpret mode: simulated VMEM and DMAs, uninitialised memory
# filled with NaN, out-of-bounds reads raise, and grid axes marked "parallel" run in random order.
INTERPRET = {"tpu": pltpu.InterpretParams(random_seed=0), "gpu": True}
# Relative tolerances: error / max(1, max|reference|).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


pytestmark = pytest.mark.usefixtures("quick_compiles")


def _inputs(b, t, s, hq, hkv, d, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d))
  k = rng.standard_normal((b, s, hkv, d))
  v = rng.standard_normal((b, s, hkv, d))
  do = rng.standard_normal((b, t, hq, d))
  return [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(do, jnp.float32)]


def _packed_segments(b, n, seed=1):
  """Documents of random lengths packed into each row: int32 [B, n]."""
  rng = np.random.default_rng(seed)
  starts = rng.random((b, n)) < 0.03
  starts[:, 0] = False
  return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def _value_and_grads(fn):
  """jit(q, k, v, do) -> (o, dq, dk, dv) for fn(q, k, v)."""

  @jax.jit
  def run(q, k, v, do):
    o, vjp = jax.vjp(fn, q, k, v)
    return (o, *vjp(do.astype(o.dtype)))

  return run


def _assert_close(got, want, tol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


# ------------------------------------------------------------------------------- references


def _numpy_attention(q, k, v, mask, scale, softcap=None):
  """Loops, one query and head at a time. q [T,Hq,D], k/v [S,Hkv,D], mask [T,S]."""
  t, hq, d = q.shape
  g = hq // k.shape[1]
  o = np.zeros((t, hq, d))
  for i in range(t):
    for h in range(hq):
      keys = [j for j in range(k.shape[0]) if mask[i, j]]
      if not keys:
        continue  # a fully masked row outputs 0
      logits = np.array([scale * np.dot(q[i, h], k[j, h // g]) for j in keys])
      if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
      w = np.exp(logits - logits.max())
      w /= w.sum()
      o[i, h] = sum(wj * v[j, h // g] for wj, j in zip(w, keys))
  return o


def test_reference_matches_hand_computed_2x3():
  """T=2 queries, S=3 keys, 2 query heads sharing 1 KV head, head_dim 2."""
  q = np.array([[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.5], [-1.0, 1.0]]])  # [T, Hq, D]
  k = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])  # [S, Hkv, D]
  v = np.array([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]])
  scale = 0.5
  # Non-causal, query 0 head 0: logits 0.5 * (1, 0, 1) -> weights e^.5, 1, e^.5.
  w = np.array([np.exp(0.5), 1.0, np.exp(0.5)])
  expected = (w[:, None] * v[:, 0]).sum(0) / w.sum()
  full = np.ones((2, 3), bool)
  np.testing.assert_allclose(_numpy_attention(q, k, v, full, scale)[0, 0], expected, rtol=1e-12)
  args = [jnp.asarray(x[None], jnp.float32) for x in (q, k, v)]
  # Capped at 0.3, query 0 head 0's logits 0.5 * (1, 0, 1) become 0.3 tanh(5/3) * (1, 0, 1).
  w = np.array([np.exp(0.3 * np.tanh(5 / 3)), 1.0, np.exp(0.3 * np.tanh(5 / 3))])
  np.testing.assert_allclose(_numpy_attention(q, k, v, full, scale, softcap=0.3)[0, 0],
                             (w[:, None] * v[:, 0]).sum(0) / w.sum(), rtol=1e-12)
  cases = [
      (dict(causal=False), full),
      (dict(causal=True), np.tril(full)),
      (dict(causal=False, sliding_window=1), np.array([[1, 1, 1], [0, 1, 1]], bool)),
      (dict(causal=True, softcap=0.3), np.tril(full)),
      # Query 1 is in segment 7 that no key has: a fully masked row, output 0.
      (dict(causal=False, segment_ids=(jnp.array([[0, 7]]), jnp.array([[0, 0, 1]]))),
       np.array([[1, 1, 0], [0, 0, 0]], bool)),
  ]
  for kwargs, mask in cases:
    got = flash_attention_reference(*args, scale=scale, **kwargs)[0]
    want = _numpy_attention(q, k, v, mask, scale, softcap=kwargs.get("softcap"))
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(kwargs))
    # The dense oracle of the soft-capping and sliding-window tests, on the same case.
    oracle = dense_attention(*args, jnp.asarray(mask[None]), scale=scale,
                             softcap=kwargs.get("softcap"))[0]
    np.testing.assert_allclose(oracle, want, atol=1e-6, err_msg=str(kwargs))
  np.testing.assert_allclose(got[1], 0.0)


def test_reference_agrees_with_model_attention():
  """Two independent XLA implementations: flash_attention_reference and attention(impl="xla")."""
  q, k, v, _ = _inputs(2, 33, 33, 8, 2, 16, jnp.float32)
  seg = _packed_segments(2, 33)
  for kwargs in (dict(causal=True), dict(causal=False, sliding_window=5),
                 dict(causal=True, segment_ids=seg, sliding_window=9)):
    np.testing.assert_allclose(flash_attention_reference(q, k, v, **kwargs),
                               attention(q, k, v, impl="xla", **kwargs), atol=1e-5)


# ----------------------------------------------------------------------------------- kernels

# (B, T, S, Hq, Hkv, D, causal, window, segments, dtype, block_sizes, backend)
CASES = [
    (2, 1, 1, 4, 4, 64, True, None, False, jnp.float32, None, "tpu"),
    (1, 7, 7, 8, 2, 128, True, None, False, jnp.float32, None, "tpu"),
    (1, 128, 128, 9, 3, 64, False, None, False, jnp.float32, B64, "tpu"),
    (2, 129, 129, 8, 2, 64, True, None, True, jnp.float32, B64, "tpu"),
    (1, 384, 384, 4, 4, 128, True, 100, False, jnp.float32, B128, "tpu"),
    (1, 7, 129, 9, 3, 64, False, None, False, jnp.float32, B64, "tpu"),
    (1, 129, 7, 4, 4, 64, True, None, False, jnp.float32, None, "tpu"),
    (1, 384, 128, 8, 2, 64, False, 50, False, jnp.float32, B_MIXED, "tpu"),
    (1, 384, 384, 8, 2, 128, True, 64, True, jnp.bfloat16, B_MIXED, "tpu"),
    (1, 129, 129, 9, 3, 128, False, None, True, jnp.bfloat16, B128, "tpu"),
    (2, 1, 7, 8, 2, 64, False, None, False, jnp.bfloat16, None, "tpu"),
    (1, 384, 384, 9, 3, 64, True, None, True, jnp.float32, B256, "tpu"),
    # The Triton variant, interpreted: the same math behind different block specs.
    (1, 7, 7, 8, 2, 128, True, None, False, jnp.float32, None, "gpu"),
    (2, 129, 129, 9, 3, 64, True, None, True, jnp.float32, B64, "gpu"),
    (1, 384, 384, 4, 4, 128, True, 100, False, jnp.float32, B_MIXED, "gpu"),
    (1, 7, 129, 8, 2, 64, False, None, False, jnp.bfloat16, None, "gpu"),
    (1, 384, 384, 8, 2, 64, False, 64, True, jnp.bfloat16, B128, "gpu"),
    # f32 head_dim 256: the default GPU blocks shrink to 64 x 32 (shared memory).
    (1, 100, 100, 4, 2, 256, True, None, True, jnp.float32, None, "gpu"),
]


def _case_id(c):
  b, t, s, hq, hkv, d, causal, window, seg, dtype, blocks, backend = c
  bs = "default" if blocks is None else f"{blocks.block_q}x{blocks.block_k}"
  return (f"{backend}-B{b}-T{t}-S{s}-H{hq}:{hkv}-D{d}-{'causal' if causal else 'full'}"
          f"-w{window}-{'seg' if seg else 'noseg'}-{jnp.dtype(dtype).name}-{bs}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case):
  b, t, s, hq, hkv, d, causal, window, seg, dtype, blocks, backend = case
  q, k, v, do = _inputs(b, t, s, hq, hkv, d, dtype)
  segment_ids = None
  if seg:
    segment_ids = _packed_segments(b, t) if t == s else (_packed_segments(b, t),
                                                          _packed_segments(b, s))
  kwargs = dict(causal=causal, sliding_window=window, segment_ids=segment_ids)
  kernel = _value_and_grads(functools.partial(
      flash_attention, impl="pallas", interpret=INTERPRET[backend], block_sizes=blocks,
      backend=backend, **kwargs))
  reference = _value_and_grads(functools.partial(flash_attention_reference, **kwargs))
  for name, got, want in zip(("o", "dq", "dk", "dv"), kernel(q, k, v, do), reference(q, k, v, do)):
    assert got.dtype == want.dtype == dtype, name
    _assert_close(got, want, TOL[dtype], name)


# Gemma 2 and Mistral: soft-capping (forward and backward through tanh) and windows shorter than
# the sequence, against the dense oracle (tests/attention_oracle.py) with an explicit mask. q is
# scaled up so the scores (std ~4) reach the cap's bend.
# (B, T, S, Hq, Hkv, D, causal, window, softcap, segments, dtype, block_sizes, backend)
CAP_CASES = [
    (1, 130, 130, 8, 2, 64, True, 40, 5.0, False, jnp.float32, B64, "tpu"),
    (2, 70, 70, 6, 2, 64, True, None, 3.0, True, jnp.float32, None, "tpu"),
    (1, 130, 130, 8, 2, 64, True, 40, 5.0, False, jnp.float32, B64, "gpu"),
    (1, 33, 100, 4, 1, 128, False, 20, 2.0, False, jnp.bfloat16, None, "gpu"),
]


@pytest.mark.parametrize("case", CAP_CASES, ids=lambda c: (
    f"{c[-1]}-T{c[1]}-S{c[2]}-H{c[3]}:{c[4]}-D{c[5]}-{'causal' if c[6] else 'full'}-w{c[7]}"
    f"-cap{c[8]}-{'seg' if c[9] else 'noseg'}-{jnp.dtype(c[10]).name}"))
def test_softcap_and_window_match_dense_oracle(case):
  b, t, s, hq, hkv, d, causal, window, softcap, seg, dtype, blocks, backend = case
  q, k, v, do = _inputs(b, t, s, hq, hkv, d, dtype, seed=6)
  q = (4 * q).astype(dtype)
  mask = position_mask(np.arange(t), np.arange(s), causal=causal, window=window)[None]
  segment_ids = None
  if seg:
    segment_ids = _packed_segments(b, t, seed=7)
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  kwargs = dict(causal=causal, sliding_window=window, softcap=softcap, segment_ids=segment_ids)
  oracle = _value_and_grads(functools.partial(dense_attention, mask=mask, scale=d ** -0.5,
                                              softcap=softcap))
  want = oracle(q, k, v, do)
  runs = {"kernel": _value_and_grads(functools.partial(
              flash_attention, impl="pallas", interpret=INTERPRET[backend], block_sizes=blocks,
              backend=backend, **kwargs)),
          "xla": _value_and_grads(functools.partial(flash_attention, impl="xla", **kwargs))}
  for run_name, run in runs.items():
    for name, got, ref in zip(("o", "dq", "dk", "dv"), run(q, k, v, do), want):
      assert got.dtype == dtype, name
      _assert_close(got, ref, TOL[dtype], f"{run_name} {name}")
  # The cap matters here: without it the output is far off.
  uncapped = dense_attention(q, k, v, mask, scale=d ** -0.5)
  assert np.max(np.abs(np.float32(want[0]) - uncapped)) > 0.1


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_fully_masked_rows_are_zero_with_finite_grads(backend):
  q, k, v, do = _inputs(1, 20, 20, 4, 2, 64, jnp.float32)
  q_seg = jnp.asarray([[0] * 10 + [3] * 10], jnp.int32)  # segment 3 has no keys
  kv_seg = jnp.zeros((1, 20), jnp.int32)
  kernel = _value_and_grads(functools.partial(
      flash_attention, segment_ids=(q_seg, kv_seg), causal=True, impl="pallas", backend=backend,
      interpret=INTERPRET[backend]))
  o, dq, dk, dv = kernel(q, k, v, do)
  np.testing.assert_array_equal(o[0, 10:], 0.0)
  np.testing.assert_array_equal(dq[0, 10:], 0.0)
  assert all(np.all(np.isfinite(x)) for x in (o, dq, dk, dv))


def test_independent_implementation_jax_mha():
  """jax.experimental.pallas.ops.gpu.attention.mha (interpreted) on shapes it supports.

  Its conventions differ: no GQA (Hq == Hkv), lengths a multiple of its blocks, one segment_ids
  array for q and kv, sm_scale defaults to 1.0, and its dQ/dKV blocks must split T and S into
  the same number of blocks.
  """
  from jax.experimental.pallas.ops.gpu import attention as jax_attention

  q, k, v, do = _inputs(1, 128, 128, 2, 2, 64, jnp.float32)
  seg = _packed_segments(1, 128)
  scale = 0.125
  jax_blocks = jax_attention.BlockSizes(block_q=64, block_k=64, block_q_dkv=64,
                                        block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
  theirs = _value_and_grads(lambda q, k, v: jax_attention.mha(
      q, k, v, seg, sm_scale=scale, causal=True, block_sizes=jax_blocks, interpret=True))
  ours = _value_and_grads(functools.partial(
      flash_attention, segment_ids=seg, scale=scale, causal=True, impl="pallas", interpret=True))
  for name, a, b in zip(("o", "dq", "dk", "dv"), ours(q, k, v, do), theirs(q, k, v, do)):
    _assert_close(a, b, 1e-4, name)


def test_block_ranges_skip_exactly_the_fully_masked_blocks():
  """A KV block is visited iff some query in the block sees some key in it (padding aside)."""
  for (t, s, bq, bk), causal, window in itertools.product(
      [(64, 64, 16, 16), (48, 80, 16, 8), (80, 48, 8, 16)], [True, False], [None, 1, 13]):
    i = np.arange(t)[:, None]
    j = np.arange(s)[None, :]
    mask = np.ones((t, s), bool)
    if causal:
      mask &= j <= i
    if window is not None:
      mask &= i - j < window
    for iq in range(t // bq):
      lo, hi = fc.kv_block_range(iq, bq=bq, bk=bk, nk=s // bk, causal=causal, window=window)
      needed = [mask[iq * bq:(iq + 1) * bq, ik * bk:(ik + 1) * bk].any() for ik in range(s // bk)]
      assert needed == [lo <= ik <= hi for ik in range(s // bk)], (t, s, causal, window, iq)
    for ik in range(s // bk):
      lo, hi = fc.q_block_range(ik, bq=bq, bk=bk, nq=t // bq, causal=causal, window=window)
      needed = [mask[iq * bq:(iq + 1) * bq, ik * bk:(ik + 1) * bk].any() for iq in range(t // bq)]
      assert needed == [lo <= iq <= hi for iq in range(t // bq)], (t, s, causal, window, ik)


# ------------------------------------------------------------------------- attention.py entry


def test_attention_pallas_equals_xla():
  q, k, v, do = _inputs(2, 70, 70, 8, 2, 64, jnp.float32, seed=3)
  kwargs = dict(segment_ids=_packed_segments(2, 70), sliding_window=24, causal=True, softcap=2.0)
  pallas = _value_and_grads(functools.partial(attention, impl="pallas", **kwargs))
  xla = _value_and_grads(functools.partial(attention, impl="xla", **kwargs))
  for name, a, b in zip(("o", "dq", "dk", "dv"), pallas(q, k, v, do), xla(q, k, v, do)):
    _assert_close(a, b, TOL[jnp.float32], name)
  with pytest.raises(ValueError, match="impl"):
    attention(q, k, v, impl="triton")


@pytest.mark.parametrize("impl", ["xla", "pallas", "auto"])
def test_cached_attention_matches_numpy(impl):
  b, tq, s, hq, hkv, d = 3, 3, 10, 4, 2, 8
  q, k, v, _ = _inputs(b, tq, s, hq, hkv, d, jnp.float32, seed=4)
  lengths = np.array([3, 7, 10], np.int32)
  for window in (None, 4):
    got = cached_attention(q, k, v, jnp.asarray(lengths), sliding_window=window, impl=impl)
    for row in range(b):
      slot = lengths[row] - tq + np.arange(tq)[:, None]  # [Tq, 1]
      mask = np.arange(s)[None, :] <= slot
      if window is not None:
        mask &= slot - np.arange(s)[None, :] < window
      want = _numpy_attention(np.asarray(q[row]), np.asarray(k[row]), np.asarray(v[row]), mask,
                              d ** -0.5)
      np.testing.assert_allclose(got[row], want, atol=1e-5, err_msg=f"row {row} window {window}")
  with pytest.raises(ValueError, match="impl"):
    cached_attention(q, k, v, jnp.asarray(lengths), impl="cuda")


def test_bad_shapes_are_reported():
  q, k, v, _ = _inputs(1, 8, 8, 6, 4, 16, jnp.float32)
  with pytest.raises(ValueError, match="multiple of KV heads"):
    flash_attention(q, k, v, impl="pallas")
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=96)
  with pytest.raises(ValueError, match="softcap"):
    flash_attention(q, k[:, :, :3], v[:, :, :3], softcap=0.0)
