"""The jitted train and eval steps: pure functions of (state, batch).

Gradient accumulation happens inside the step as a `lax.scan` over microbatches, so peak
activation memory is one microbatch and the host dispatches one program per optimizer step.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from model import sharding
from train.state import TrainState

# loss_fn(params, frozen, batch) -> (sum of losses, metrics as sums incl. "count", the number the
# sums are divided by: trainable tokens, pairs or sequences, counted over the whole batch).
LossFn = Callable


def _split_microbatches(batch, n: int, mesh):
  """[B, ...] -> [n, B/n, ...], microbatch m = rows m, m+n, m+2n, ...

  Strided, not contiguous: the batch is sharded by rows, so every microbatch keeps rows on
  every device and the scan never moves data between devices.
  """
  def split(x):
    b = x.shape[0]
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    spec = PartitionSpec(None, sharding.BATCH_AXES)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, microbatches: int,
                    mesh, param_shardings, schedule=None):
  """Returns train_step(state, batch) -> (state, metrics); jit it with explicit shardings."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    params = state.params
    if microbatches == 1:
      (_, sums), grads = grad_fn(params, state.frozen, batch)
    else:
      def micro(carry, mb):
        g_acc, m_acc = carry
        (_, m), g = grad_fn(params, state.frozen, mb)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        g_acc = jax.lax.with_sharding_constraint(g_acc, param_shardings)
        return (g_acc, jax.tree.map(jnp.add, m_acc, m)), None

      mbs = _split_microbatches(batch, microbatches, mesh)
      first = jax.tree.map(lambda x: x[0], mbs)
      m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                            jax.eval_shape(lambda: grad_fn(params, state.frozen, first)[0][1]))
      g_zero = jax.tree.map(jnp.zeros_like, params)
      (grads, sums), _ = jax.lax.scan(micro, (g_zero, m_zero), mbs)

    # One division by the count of the whole accumulated batch (see tasks/pretrain.py), so
    # accumulation never reweights examples.
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    metrics = {k: v / count for k, v in sums.items() if k != "count"}
    metrics["count"] = sums["count"]
    metrics["grad_norm"] = optax.tree.norm(grads)
    # A non-finite loss, gradient or update (an overflow, an lr of inf) changes nothing: the
    # step keeps the parameters and optimizer state it had, and says so in "nonfinite"; the
    # loop stops or goes on (train.on_nonfinite).
    finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
              & jnp.isfinite(optax.tree.norm(updates)))
    metrics["nonfinite"] = 1 - finite.astype(jnp.int32)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (optax.apply_updates(params, updates), opt_state), (params, state.opt_state))
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(loss_fn: LossFn):
  """eval_step(params, frozen, batch) -> metric sums (the caller divides by "count" over
  batches)."""
  def eval_step(params, frozen, batch):
    _, sums = loss_fn(params, frozen, batch)
    return sums
  return eval_step
