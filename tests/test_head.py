"""model/head.py against a dense reference written plainly here (the full logits, then
jax.nn.logsumexp), values and gradients; bf16; a (2, 2, 2) mesh against one device; the
compiler's memory plan against the dense loss's; and a compile for TPU."""


import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from model import ModelConfig, sharding
from model.head import token_scores

D, V = 16, 300  # V > 2 x 128: the backward's vocab slabs (128 wide) overlap at the end
# The loss mixes all three outputs, so every cotangent path of the custom VJP is exercised:
# the NLL, a z-loss and an entropy bonus, over masked positions.
Z_LOSS, ENTROPY = 0.1, 0.3


def head_params(tied, seed=0, scale=1.0):
  w = np.random.default_rng(seed).normal(size=(V, D) if tied else (D, V)) * scale
  return {"embedding" if tied else "lm_head": jnp.asarray(w, jnp.float32)}


def inputs(b, t, seed=1, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(b, t, D)), dtype)
  y = r.integers(0, V, (b, t))
  mask = (r.uniform(size=(b, t)) < 0.7).astype(np.float32)
  mask[0, 0] = 1.0
  y = np.where(mask > 0, y, np.where(np.arange(t) % 2, -100, V + 5))  # junk ids where masked
  return x, jnp.asarray(y, jnp.int32), jnp.asarray(mask)


def dense_scores(x, params, y, tied, temperature, dtype=jnp.float32, softcap=0.0):
  """The reference: full f32 logits in one einsum (softcapped as Gemma 2's head), then
  log-softmax by logsumexp; jax.grad differentiates it."""
  w = params["embedding" if tied else "lm_head"].astype(dtype)
  logits = jnp.einsum("BTD,VD->BTV" if tied else "BTD,DV->BTV", x.astype(dtype), w,
                      preferred_element_type=jnp.float32)
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = logits / (temperature if temperature > 0 else 1.0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, jnp.clip(y, 0, V - 1)[..., None], axis=-1)[..., 0]
  entropy = log_z - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
  return target - log_z, log_z, entropy


def loss(scores, mask):
  logp, log_z, entropy = scores
  return (-jnp.sum(logp * mask) + Z_LOSS * jnp.sum(jnp.square(log_z) * mask)
          - ENTROPY * jnp.sum(entropy * mask))


def cfg_of(tied, dtype="float32"):
  return ModelConfig(vocab_size=V, d_model=D, tie_embeddings=tied, dtype=dtype)


def chunked_fn(cfg, temperature, chunk):
  def f(x, params, y, mask):
    s = token_scores(x, params, cfg, y, temperature=temperature, chunk=chunk, entropy=True)
    return loss(s, mask), s
  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)


def dense_fn(tied, temperature, dtype=jnp.float32, softcap=0.0):
  def f(x, params, y, mask):
    s = dense_scores(x, params, y, tied, temperature, dtype, softcap)
    return loss(s, mask), s
  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)


def assert_close(got, want, rtol):
  """Each array within rtol of the largest magnitude of its reference."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w,
                               atol=rtol * max(np.abs(w).max(), 1.0), rtol=0)


# (tied, B, T, chunk, temperature). Chunks of 3 and 4 tokens divide neither T nor B x T;
# 0 is all tokens at once; 64 is more than there are.
CASES = [(True, 2, 7, 3, 0.7), (False, 3, 5, 4, 1.0), (False, 1, 9, 0, 1.3),
         (True, 2, 4, 64, 1.0)]


@pytest.mark.parametrize("tied,b,t,chunk,temperature", CASES)
def test_values_and_gradients_equal_the_dense_reference(tied, b, t, chunk, temperature):
  params = head_params(tied)
  x, y, mask = inputs(b, t)
  (got_loss, got), got_grads = jax.jit(chunked_fn(cfg_of(tied), temperature, chunk))(
      x, params, y, mask)
  (want_loss, want), want_grads = jax.jit(dense_fn(tied, temperature))(x, params, y, mask)
  assert all(a.shape == (b, t) and a.dtype == jnp.float32 for a in got)
  assert_close(got, want, 1e-5)
  assert_close(got_loss, want_loss, 1e-5)
  assert_close(got_grads, want_grads, 1e-5)
  # Masked positions carry junk ids (-100, V + 5): finite, and no gradient from them.
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(got_grads))


@pytest.mark.parametrize("tied,temperature", [(True, 1.0), (False, 0.7)])
def test_final_softcap_values_and_gradients(tied, temperature):
  """Gemma 2's final softcap (model.final_softcap) is part of the scored logits, as it is of
  the model's head: c small enough that tanh bends the logits (they reach ~|8| here)."""
  params = head_params(tied, scale=2.0)
  x, y, mask = inputs(2, 5)
  cfg = dataclasses.replace(cfg_of(tied), final_softcap=2.0)
  (got_loss, got), got_grads = jax.jit(chunked_fn(cfg, temperature, 3))(x, params, y, mask)
  (want_loss, want), want_grads = jax.jit(dense_fn(tied, temperature, softcap=2.0))(
      x, params, y, mask)
  assert_close(got, want, 1e-5)
  assert_close(got_loss, want_loss, 1e-5)
  assert_close(got_grads, want_grads, 1e-5)
  (_, uncapped), _ = jax.jit(dense_fn(tied, temperature))(x, params, y, mask)
  assert np.abs(np.asarray(uncapped[0]) - np.asarray(want[0])).max() > 1.0  # it matters


def test_temperature_zero_scores_the_raw_logits_and_closed_forms():
  # An identity head (D = V, lm_head = I) makes the hidden states the logits themselves.
  cfg = ModelConfig(vocab_size=8, d_model=8, n_heads=2, n_kv_heads=1, tie_embeddings=False)
  params = {"lm_head": jnp.eye(8)}
  logits = np.random.default_rng(2).normal(size=(2, 3, 8)) * 3
  logits[1, 2] = 0.0  # uniform: log p = -log V, log Z = log V, entropy = log V
  y = np.array([[0, 7, 3], [5, 5, 1]])
  s = token_scores(jnp.asarray(logits, jnp.float32), params, cfg, jnp.asarray(y),
                   temperature=0.0, chunk=4, entropy=True)
  log_z = np.log(np.exp(logits).sum(-1))
  p = np.exp(logits - log_z[..., None])
  np.testing.assert_allclose(s.logp, np.take_along_axis(logits, y[..., None], -1)[..., 0] - log_z,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.log_z, log_z, rtol=1e-6)
  np.testing.assert_allclose(s.entropy, -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([s.logp[1, 2], s.log_z[1, 2], s.entropy[1, 2]],
                             [-np.log(8), np.log(8), np.log(8)], rtol=1e-6)
  assert token_scores(jnp.asarray(logits, jnp.float32), params, cfg, jnp.asarray(y)).entropy \
      is None


def test_bf16_is_within_bf16_tolerance():
  tied = False  # as Llama 3; the layouts differ only in einsum strings, checked in f32 above
  params = head_params(tied, scale=0.3)
  x, y, mask = inputs(2, 7, dtype=jnp.bfloat16)
  (_, got), got_grads = jax.jit(chunked_fn(cfg_of(tied, "bfloat16"), 0.7, 3))(
      x, params, y, mask)
  # The same bf16 operands with f32 accumulation: only rounding of the backward's bf16 dz.
  (_, same), same_grads = jax.jit(dense_fn(tied, 0.7, jnp.bfloat16))(x, params, y, mask)
  assert got_grads[0].dtype == jnp.bfloat16 and got_grads[1][next(iter(params))].dtype == \
      jnp.float32
  assert_close(got, same, 1e-5)
  assert_close(got_grads, same_grads, 2e-2)
  # Against all-f32 math: bf16's 8 bits of mantissa.
  (_, f32), f32_grads = jax.jit(dense_fn(tied, 0.7))(x.astype(jnp.float32), params, y, mask)
  assert_close(got, f32, 2e-2)
  assert_close(got_grads, f32_grads, 5e-2)


@pytest.mark.parametrize("tied,b", [(True, 4), (False, 4), (False, 2)],
                         ids=["tied", "untied", "batch-not-split"])
def test_mesh_2x2x2_equals_one_device(tied, b):
  # Tokens over (data, fsdp), vocab over tensor, the head's D split over fsdp; with 2 rows
  # the batch cannot split 4 ways and is replicated instead.
  mesh = sharding.make_mesh(2, 2, 2)
  params = head_params(tied)
  x, y, mask = inputs(b, 7)
  fn = chunked_fn(cfg_of(tied), 0.7, 3)
  want = jax.jit(fn)(x, params, y, mask)
  logical = ("vocab", "embed") if tied else ("embed", "vocab")
  spec = lambda names, shape: NamedSharding(mesh, sharding.logical_to_spec(P(*names), shape,
                                                                           mesh))
  w_sh = {k: spec(logical, w.shape) for k, w in params.items()}
  rows = spec(("batch",), (b,))
  got = jax.jit(sharding.in_mesh(fn, mesh), in_shardings=(rows, w_sh, rows, rows))(
      x, params, y, mask)
  assert_close(got, want, 1e-5)
  if b == 4:  # the head's gradient comes back split like the head: D reduce-scattered
    key = next(iter(params))
    assert got[1][1][key].sharding.spec == w_sh[key].spec


def test_errors_name_the_problem():
  params = head_params(False)
  x, y, _ = inputs(1, 3)
  with pytest.raises(ValueError, match="value_head"):
    token_scores(x, params, ModelConfig(value_head=True), y)
  with pytest.raises(ValueError, match="lm_head"):
    token_scores(x, params, cfg_of(True), y)
  with pytest.raises(ValueError, match=r"targets \(1, 2\)"):
    token_scores(x, params, cfg_of(False), y[:, :2])
  with pytest.raises(ValueError, match="train.loss_chunk=-1"):
    token_scores(x, params, cfg_of(False), y, chunk=-1)


def _compiled_temp_bytes(fn, mesh, b, t, d, v):
  """Temporaries per device of value_and_grad(fn) w.r.t. hidden states and head, compiled
  for `mesh` (rows over fsdp, the head split like the parameter: D over fsdp, V over
  tensor), bf16 hidden states."""
  rows = NamedSharding(mesh, P("fsdp"))
  head = NamedSharding(mesh, sharding.logical_to_spec(P("embed", "vocab"), (d, v), mesh))
  args = (jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16, sharding=rows),
          jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=head),
          jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows))
  step = jax.jit(sharding.in_mesh(jax.value_and_grad(fn, argnums=(0, 1)), mesh))
  return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def _chunked_loss(d, v, chunk):
  cfg = ModelConfig(vocab_size=v, d_model=d, n_heads=4, n_kv_heads=4, tie_embeddings=False,
                    dtype="bfloat16")

  def loss_fn(x, w, y):
    s = token_scores(x, {"lm_head": w}, cfg, y, chunk=chunk)
    return -jnp.sum(s.logp) + 1e-4 * jnp.sum(jnp.square(s.log_z))
  return loss_fn


def test_the_compiler_plans_less_than_one_logits_array():
  # NLL + z-loss on 8 devices, (data, fsdp, tensor) = (1, 4, 2): the dense loss's temporaries
  # exceed one f32 [rows, T, V / tensor] logits array per device; the chunked loss's stay
  # under it (a few [chunk, V / tensor] blocks and the gathered head).
  b, t, d, v = 4, 1024, 128, 8192
  mesh = sharding.make_mesh(1, 4, 2)

  def dense(x, w, y):
    logits = jnp.einsum("BTD,DV->BTV", x, w.astype(jnp.bfloat16),
                        preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch", "length", "act_vocab"))
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jnp.sum(log_z - target) + 1e-4 * jnp.sum(jnp.square(log_z))

  logits_bytes = (b // 4) * t * (v // 2) * 4
  chunked = _compiled_temp_bytes(_chunked_loss(d, v, 128), mesh, b, t, d, v)
  assert chunked < logits_bytes < _compiled_temp_bytes(dense, mesh, b, t, d, v)


def test_compiles_for_tpu(target_devices):
  # The real TPU compiler accepts the sharded loss (shard_map, psum over the vocab shards,
  # the head's gradient reduce-scattered), and plans no logits-sized temporaries for it.
  b, t, d, v = 4, 1024, 128, 8192
  mesh = sharding.make_mesh(1, 2, 2, devices=target_devices("v5e-4"))
  temp = _compiled_temp_bytes(_chunked_loss(d, v, 128), mesh, b, t, d, v)
  assert temp < (b // 2) * t * (v // 2) * 4
