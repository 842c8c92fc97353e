"""bench/xla_profile.py: a traced jitted function's time, grouped by the JAX op that emitted
each HLO instruction."""

import jax
import jax.numpy as jnp

from bench import xla_profile


def test_the_profile_names_the_einsums_that_ran():
  @jax.jit
  def f(x_TD, w_DF):
    y_TF = jnp.einsum("TD,DF->TF", x_TD, w_DF)
    return y_TF, jnp.tanh(y_TF).sum()  # y is an output: the dot is its own instruction

  x, w = jnp.ones((256, 128)), jnp.ones((128, 512))
  jax.block_until_ready(f(x, w))
  with xla_profile.traced() as trace:
    for _ in range(3):
      jax.block_until_ready(f(x, w))
  out = xla_profile.by_source(trace, f.lower(x, w).compile().as_text(), steps=3)
  sources = [r["source"] for r in out["rows"]]
  assert any("TD,DF->TF" in s for s in sources), sources
  assert out["ops_ms"] > 0 and abs(sum(r["share"] for r in out["rows"]) - 1) < 0.01
  assert sum(out["busy_ms"]) > 0
