"""The XLA paths of `attention` (causal block skipping) and `cached_attention` against dense
references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_oracle import dense_attention, position_mask
from pallas_kernels.attention import attention, cached_attention
from pallas_kernels.flash_attention import flash_attention_reference


@pytest.mark.parametrize("t,block_q,window,causal", [
    (1, 64, None, True), (7, 4, None, True), (129, 32, None, True), (200, 64, 50, True),
    (96, 32, 1, True), (64, 16, None, False)])
def test_blocked_matches_dense_reference(t, block_q, window, causal):
  b, n, k, h = 2, 6, 2, 16
  rng = np.random.default_rng(t)
  q, key, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, k, k))
  seg = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1), jnp.int32)

  def run(fn, q, key, v):
    return fn(q, key, v, segment_ids=seg, causal=causal, sliding_window=window)

  blocked = lambda *a, **kw: attention(*a, **kw, impl="xla", block_q=block_q)
  np.testing.assert_allclose(run(blocked, q, key, v),
                             run(flash_attention_reference, q, key, v), atol=2e-6)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(run(fn, *a)))
  g_blocked = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, key, v)
  g_ref = jax.grad(loss(flash_attention_reference), argnums=(0, 1, 2))(q, key, v)
  for a, r in zip(g_blocked, g_ref):
    np.testing.assert_allclose(a, r, atol=2e-5)


def test_softcap_and_window_match_dense_oracle():
  """Gemma 2's soft-capping with GQA (6 query heads on 2 KV heads), and a window shorter than
  the sequence: the blocked XLA path, forward and gradients, against the dense oracle."""
  b, t, n, k, h, block_q, window, softcap = 2, 48, 6, 2, 16, 16, 20, 5.0
  rng = np.random.default_rng(0)
  q, key, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, k, k))
  q = 4 * q  # scores of std ~4: the cap bends them
  seg = np.sort(rng.integers(1, 3, (b, t)), axis=1)
  mask = position_mask(np.arange(t), np.arange(t), window=window)[None]
  mask = mask & (seg[:, :, None] == seg[:, None, :])
  blocked = lambda q, key, v: attention(q, key, v, segment_ids=jnp.asarray(seg, jnp.int32),
                                        sliding_window=window, softcap=softcap, impl="xla",
                                        block_q=block_q)
  oracle = lambda q, key, v: dense_attention(q, key, v, mask, scale=h ** -0.5, softcap=softcap)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  value_and_grads = lambda fn: jax.jit(lambda *a: (fn(*a), jax.grad(loss(fn), (0, 1, 2))(*a)))
  (o_blocked, g_blocked), (o_oracle, g_oracle) = (value_and_grads(fn)(q, key, v)
                                                  for fn in (blocked, oracle))
  np.testing.assert_allclose(o_blocked, o_oracle, atol=2e-6)
  for name, a, r in zip(("dq", "dk", "dv"), g_blocked, g_oracle):
    np.testing.assert_allclose(a, r, atol=2e-5, err_msg=name)


def test_cached_attention_softcap_and_window_match_dense_oracle():
  """New tokens against a contiguous cache (decode / verification), rows of ragged lengths."""
  b, tq, s, n, k, h = 3, 4, 40, 8, 2, 16
  rng = np.random.default_rng(0)
  q = jnp.asarray(4 * rng.normal(size=(b, tq, n, h)), jnp.float32)
  key, v = (jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.float32) for _ in range(2))
  lengths = np.array([4, 17, 40], np.int32)
  q_pos = lengths[:, None] - tq + np.arange(tq)  # [B, Tq]
  for window, softcap in ((9, 3.0), (None, 3.0), (9, None)):
    mask = position_mask(q_pos, np.arange(s), window=window)
    got = jax.jit(lambda q, key, v, lengths: cached_attention(
        q, key, v, lengths, sliding_window=window, softcap=softcap, impl="xla"))(
            q, key, v, jnp.asarray(lengths))
    want = dense_attention(q, key, v, mask, scale=h ** -0.5, softcap=softcap)
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"window {window} cap {softcap}")
