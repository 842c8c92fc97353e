"""The XLA path of `attention` (causal block skipping) against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention
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
