"""A dense attention oracle for the kernel tests, sharing nothing with pallas_kernels.

Every score is formed, the mask is an explicit bool array the test builds, GQA repeats K/V
(the kernels and their references never do), and soft-capping is written out. The kernels,
their references and the XLA paths are all compared with this.
"""

import jax
import jax.numpy as jnp
import numpy as np


def dense_attention(q, k, v, mask, *, scale, softcap=None):
  """q [B,T,N,H], k/v [B,S,K,H], mask bool [B,T,S] -> f32 [B,T,N,H]; query head n reads KV head
  n // (N // K). Rows with no visible key give 0. Differentiable in q, k, v."""
  g = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k, precision="highest") * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  mask = jnp.asarray(mask)[:, None]  # [B, 1, T, S]
  m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True))
  e = jnp.exp(jnp.where(mask, s - jnp.where(jnp.isfinite(m), m, 0.0), -jnp.inf))
  total = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(total == 0, 1.0, total)
  return jnp.einsum("bnts,bsnh->btnh", p, v, precision="highest")


def position_mask(q_pos, k_pos, *, causal=True, window=None):
  """bool [..., T, S] from query positions [..., T] and key positions [S] (numpy)."""
  i = np.asarray(q_pos)[..., :, None]
  j = np.asarray(k_pos)[None, :]
  mask = np.ones(np.broadcast_shapes(i.shape, j.shape), bool)
  if causal:
    mask &= j <= i
  if window is not None:
    mask &= i - j < window
  return mask
