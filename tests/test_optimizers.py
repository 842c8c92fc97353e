"""train.optimizer and train.decay: each is optax's own definition, composed independently here,
and each trains sharded over a simulated 2 x 2 x 2 mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

from model import sharding
from train import optim
from tests.test_train_step import random_batch, run_steps, small_config


def _schedule_numpy(step, *, lr, warmup, steps, decay, min_ratio, fraction=0.2):
  if step < warmup:
    return lr * step / warmup
  final, t, n = lr * min_ratio, step - warmup, steps - warmup
  if decay == "constant":
    return lr
  if decay == "linear":
    return lr + (final - lr) * min(t / n, 1)
  if decay == "cosine":
    return final + (lr - final) * 0.5 * (1 + np.cos(np.pi * min(t / n, 1)))
  cooldown = round(steps * fraction)  # wsd
  stable = n - cooldown
  return lr if t <= stable else lr + (final - lr) * min((t - stable) / cooldown, 1)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant", "wsd"])
def test_schedules(decay):
  kw = dict(lr=2.0, warmup=10, steps=110, min_ratio=0.1)
  cfg = small_config(warmup_steps=10, steps=110, lr=2.0, min_lr_ratio=0.1, decay=decay,
                     decay_fraction=0.2)
  sched = optim.learning_rate_schedule(cfg.train)
  for step in range(0, 121):
    np.testing.assert_allclose(float(sched(step)), _schedule_numpy(step, decay=decay, **kw),
                               atol=1e-5, err_msg=f"step {step}")


def test_wsd_holds_then_cools_down():
  cfg = small_config(warmup_steps=0, steps=100, lr=1.0, min_lr_ratio=0.0, decay="wsd",
                     decay_fraction=0.25)
  sched = optim.learning_rate_schedule(cfg.train)
  assert float(sched(0)) == float(sched(75)) == 1.0
  np.testing.assert_allclose([float(sched(s)) for s in (80, 90, 100)], [0.8, 0.4, 0.0],
                             atol=1e-6)


def test_bad_names_are_clear_errors():
  with pytest.raises(ValueError, match="train.optimizer='sgdd'.*muon"):
    optim.make_optimizer(small_config(optimizer="sgdd").train)
  with pytest.raises(ValueError, match="train.decay='cosin'.*wsd"):
    optim.make_optimizer(small_config(decay="cosin").train)
  with pytest.raises(ValueError, match="train.decay_fraction=1.5"):
    optim.make_optimizer(small_config(decay="wsd", decay_fraction=1.5).train)


def _params(key):
  """A named tree as the model's (model/transformer.layer_specs), 2 stacked layers."""
  ks = jax.random.split(key, 6)
  return {"embedding": jax.random.normal(ks[0], (32, 16)),
          "layers": {"attn": {"q": jax.random.normal(ks[1], (2, 16, 4, 4)),
                              "o": jax.random.normal(ks[2], (2, 4, 4, 16))},
                     "mlp": {"up": jax.random.normal(ks[3], (2, 16, 24)),
                             "down": jax.random.normal(ks[4], (2, 24, 16))},
                     "mlp_norm": {"scale": jax.random.normal(ks[5], (2, 16))}}}


def _mask(p):  # decay matrices and embeddings, not norm scales
  return {"embedding": True, "layers": {"attn": {"q": True, "o": True},
                                        "mlp": {"up": True, "down": True},
                                        "mlp_norm": {"scale": False}}}


def _reference(name, t, sched):
  clip = optax.clip_by_global_norm(t.grad_clip)
  if name == "adamw":
    tx = optax.adamw(sched, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                     mask=_mask)
  elif name == "lion":
    tx = optax.lion(sched, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=_mask)
  elif name == "adafactor":
    # optax's adafactor with an absolute step and the schedule-scaled decoupled decay.
    tx = optax.adafactor(sched, multiply_by_parameter_scale=False, weight_decay_mask=_mask,
                         weight_decay_rate=lambda c: t.weight_decay * sched(c))
  else:
    dims = {"embedding": None,
            "layers": {"attn": {"q": MuonDimensionNumbers(1, (2, 3)),
                                "o": MuonDimensionNumbers((1, 2), 3)},
                       "mlp": {"up": MuonDimensionNumbers(1, 2),
                               "down": MuonDimensionNumbers(1, 2)},
                       "mlp_norm": {"scale": None}}}
    tx = optax.contrib.muon(sched, beta=t.b1, eps=t.eps, weight_decay=t.weight_decay,
                            weight_decay_mask=_mask, adam_b1=t.b1, adam_b2=t.b2,
                            adam_weight_decay=t.weight_decay,
                            muon_weight_dimension_numbers=dims, consistent_rms=0.2)
  return optax.chain(clip, tx)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "muon"])
def test_optimizer_is_optaxs_own(name):
  cfg = small_config(optimizer=name, lr=1e-2, warmup_steps=2, steps=6, grad_clip=1.0)
  ours = optim.make_optimizer(cfg.train)
  ref = _reference(name, cfg.train, optim.learning_rate_schedule(cfg.train))
  params = _params(jax.random.PRNGKey(0))
  p_ours, p_ref = params, params
  s_ours, s_ref = ours.init(params), ref.init(params)
  for i in range(4):
    grads = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p_ours)
    u_ours, s_ours = ours.update(grads, s_ours, p_ours)
    u_ref, s_ref = ref.update(grads, s_ref, p_ref)
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               p_ours, p_ref)
  assert jax.tree.reduce(lambda n, x: n + float(jnp.abs(x).sum()),
                         jax.tree.map(jnp.subtract, p_ours, params), 0.0) > 0


def test_muon_orthogonalizes_block_matrices_only():
  cfg = small_config(optimizer="muon", lr=1.0, warmup_steps=0, weight_decay=0.0, b1=0.0,
                     grad_clip=0.0, decay="constant")
  tx = optim.make_optimizer(cfg.train)
  params = _params(jax.random.PRNGKey(1))
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(2), x.shape), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  up = np.asarray(updates["layers"]["mlp"]["up"])  # [L, D, F]
  # Muon's quintic Newton-Schulz leaves every singular value in about [0.7, 1.1] times one
  # scale (numpy SVD), where the gradient's spread far more.
  for layer, g in zip(up, np.asarray(grads["layers"]["mlp"]["up"])):
    sv, sv_g = (np.linalg.svd(m, compute_uv=False) for m in (layer, g))
    assert sv.max() / sv.min() < 1.8 and sv_g.max() / sv_g.min() > 3, (sv, sv_g)
  o = np.asarray(updates["layers"]["attn"]["o"]).reshape(2, 16, 16)  # [(N H), D]
  sv = np.linalg.svd(o[0], compute_uv=False)
  assert sv.max() / sv.min() < 1.8, sv
  # The embedding takes AdamW: its first step is -lr * sign(g) (bias-corrected moments).
  np.testing.assert_allclose(updates["embedding"], -np.sign(grads["embedding"]), atol=1e-3)


@pytest.mark.parametrize("name", ["adafactor", "lion", "muon"])
def test_trains_sharded(name):
  cfg = small_config(optimizer=name, lr=3e-3)
  losses, _ = run_steps(cfg, sharding.make_mesh(2, 2, 2), [random_batch()] * 3)
  assert np.all(np.isfinite(losses)) and losses[2] < losses[0], losses


def test_muon_axes_see_through_logical_boxes():
  """The optimizer is initialized on boxed parameters (train/state.py), updated on plain ones:
  both must give Muon the same leaves."""
  import flax.linen as nn
  params = _params(jax.random.PRNGKey(0))
  boxed = jax.tree.map(lambda x: nn.Partitioned(x, (None,) * x.ndim), params)
  is_dims = lambda x: x is None or isinstance(x, MuonDimensionNumbers)
  plain = jax.tree.leaves(optim.muon_axes(params), is_leaf=is_dims)
  unboxed = jax.tree.leaves(nn.unbox(optim.muon_axes(boxed)), is_leaf=is_dims)
  assert plain == unboxed
  assert optim.muon_axes(params)["layers"]["attn"]["q"] == MuonDimensionNumbers(-3, (-2, -1))
  assert optim.muon_axes(params)["embedding"] is None
