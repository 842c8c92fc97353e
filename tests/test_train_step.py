"""The jitted train step: its loss, gradient accumulation, and sharding over simulated meshes."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from model import ModelConfig, sharding
from train import optim
from train import step as step_lib
from train.config import load_config
from train.loop import build_program
from train.state import abstract_state, create_state
from train.tasks import pretrain

def small_config(**train):
  cfg = load_config("configs/tiny.py", {})
  with cfg.unlocked():
    cfg.model.update(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                     max_seq_len=64)
    cfg.data.seq_len = 32
    cfg.train.update({**dict(batch_size=8, microbatches=1, lr=1e-2, warmup_steps=0, steps=10),
                      **train})
  return cfg


def random_batch(b=8, t=32, vocab=256, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (b, t)).astype(np.int32)
  segments = np.ones((b, t), np.int32)
  segments[:, t // 2:] = 2  # two packed documents per row
  segments[::3, -3:] = 0  # some padding
  positions = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])
  return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
          "segment_ids": segments,
          "positions": np.broadcast_to(positions, (b, t)).astype(np.int32),
          "loss_mask": (segments != 0).astype(np.float32)}


def run_steps(cfg, mesh, batches):
  prog = build_program(cfg, ModelConfig.from_config(cfg.model), mesh)
  state = prog.init_state(cfg.seed)
  losses = []
  for b in batches:
    batch = jax.device_put(b, prog.batch_sharding)
    state, m = prog.train_step(state, batch)
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params)


class _FixedHidden:
  """Stands in for the Transformer (its cfg) and its forward (`fixed_forward`): the final
  hidden states are given (the model's own logits path is checked against numpy in
  test_tasks.py)."""

  def __init__(self, hidden, cfg):
    self.hidden, self.cfg = hidden, cfg

  def fixed_forward(self, cfg, params, *args, return_hidden=False, **kwargs):
    assert return_hidden, "the loss must not ask for the full logits"
    return self.hidden, None, None


def test_loss_with_z_loss_matches_numpy(monkeypatch):
  batch = random_batch()
  r = np.random.default_rng(1)
  hidden = r.normal(size=(8, 32, 16)).astype(np.float32)
  w = (r.normal(size=(16, 256)) * 0.5).astype(np.float32)
  model = _FixedHidden(jnp.asarray(hidden), ModelConfig(vocab_size=256, d_model=16,
                                                        tie_embeddings=False))
  monkeypatch.setattr(pretrain.transformer, "forward", model.fixed_forward)
  # A chunk of 7 tokens does not divide the 8 x 32 tokens: the last chunk overlaps.
  loss_fn = jax.jit(lambda p, b: pretrain.loss_fn(p, None, b, model=model, z_loss=1e-2,
                                                  chunk=7))
  total, sums = loss_fn({"lm_head": jnp.asarray(w)}, batch)
  logits = hidden.astype(np.float64) @ w
  z = np.log(np.exp(logits).sum(-1))
  nll = z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  np.testing.assert_allclose(sums["loss"], (nll * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(sums["z_loss"], (z**2 * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(total, (nll * mask).sum() + 1e-2 * (z**2 * mask).sum(), rtol=1e-5)
  assert sums["count"] == mask.sum()


def test_gradient_accumulation_equals_one_big_batch():
  # Plain SGD with lr 1 makes the update the gradient itself, so the comparison is not blurred
  # by Adam's division by tiny second moments.
  cfg = small_config()
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  model_cfg = ModelConfig.from_config(cfg.model)
  prog = build_program(cfg, model_cfg, mesh)
  tx = optax.sgd(1.0)
  state = create_state(prog.objective.init, tx, mesh, cfg.seed,
                       abstract_state(prog.objective.init, tx, mesh)[1])
  loss_fn = prog.objective.loss_fn
  batch = jax.device_put(random_batch(), prog.batch_sharding)
  results = []
  for n in (1, 4):
    step = jax.jit(step_lib.make_train_step(loss_fn, tx, microbatches=n, mesh=mesh,
                                            param_shardings=prog.shardings.params))
    new_state, metrics = step(state, batch)
    results.append((metrics, jax.tree.map(jnp.subtract, new_state.params, state.params)))
  (m1, update1), (m4, update4) = results
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["count"], m1["count"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-4),
               update4, update1)


@pytest.fixture(scope="module")
def single_device_run():
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  return run_steps(small_config(), mesh, [random_batch(seed=s) for s in range(3)])


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_training_matches_one_device(single_device_run, shape):
  ref_losses, ref_params = single_device_run
  mesh = sharding.make_mesh(*shape)
  losses, params = run_steps(small_config(), mesh, [random_batch(seed=s) for s in range(3)])
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert_params_close(params, ref_params)


def assert_params_close(params, ref_params):
  # Adam divides by sqrt(second moment): where a gradient is ~0, reduction-order noise can move
  # one update by a fraction of lr (1e-2). Bound that, and require agreement nearly everywhere.
  def close(a, b):
    diff = np.abs(a - b)
    assert diff.max() < 5e-4 and diff.mean() < 1e-6, (diff.max(), diff.mean())
  jax.tree.map(close, params, ref_params)


def moe_config(impl="auto"):
  """small_config with configs/tiny_moe.py's experts: 8 of width 64, 2 per token.

  Adam's eps is raised from 1e-8 to 1e-5: an update of lr-size out of a ~0 gradient's
  reduction noise (see assert_params_close) moves router logits by ~1e-4, enough to flip a
  near-tie top-k choice, after which the runs differ by a whole expert's gradient; with it,
  the runs of any two meshes (data-parallel ones too) stay within ~1e-6 of each other."""
  cfg = small_config(eps=1e-5)
  with cfg.unlocked():
    cfg.model.update(n_experts=8, n_experts_per_token=2, moe_d_ff=64, router_aux_loss_coef=0.01,
                     router_z_loss_coef=0.001, moe_impl=impl)
  return cfg


@pytest.mark.parametrize("impl,shape", [("auto", (2, 2, 2, 1)), ("ragged", (1, 1, 4, 2))])
def test_expert_parallel_training_matches_one_device(impl, shape):
  """Three steps of an MoE model on (data, fsdp, expert, tensor) meshes equal one device's:
  the experts run per expert shard (model/moe.py), everything else as data parallelism."""
  batches = [random_batch(seed=s) for s in range(3)]
  ref_losses, ref_params = run_steps(moe_config(impl), sharding.make_mesh(
      1, 1, 1, jax.devices()[:1]), batches)
  data, fsdp, expert, tensor = shape
  mesh = sharding.make_mesh(data, fsdp, tensor, expert=expert)
  losses, params = run_steps(moe_config(impl), mesh, batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert_params_close(params, ref_params)


def _specs(config_path, mesh_shape, expert=1):
  cfg = load_config(config_path, {})
  mesh = sharding.make_mesh(*mesh_shape, expert=expert)
  prog = build_program(cfg, ModelConfig.from_config(cfg.model), mesh)
  return jax.tree.map(lambda s: s.spec, prog.shardings.params)


def test_golden_partition_specs_tiny():
  specs = _specs("configs/tiny.py", (2, 2, 2))
  layers = specs["layers"]
  assert specs["embedding"] == P("tensor", "fsdp")
  assert specs["final_norm"]["scale"] == P()
  assert layers["attn"]["q"] == P(None, "fsdp", "tensor")
  assert layers["attn"]["k"] == P(None, "fsdp", "tensor")  # 2 kv heads split 2 ways
  assert layers["attn"]["o"] == P(None, "tensor", None, "fsdp")
  assert layers["mlp"]["gate"] == P(None, "fsdp", "tensor")
  assert layers["mlp"]["down"] == P(None, "tensor", "fsdp")
  assert layers["attn_norm"]["scale"] == P()
  # On a (1, 2, 4) mesh, 2 kv heads cannot be split 4 ways: they are replicated instead.
  assert _specs("configs/tiny.py", (1, 2, 4))["layers"]["attn"]["k"] == P(None, "fsdp")


def test_golden_partition_specs_tiny_moe():
  layers = _specs("configs/tiny_moe.py", (1, 2, 2), expert=2)["layers"]
  assert layers["moe"]["router"] == P(None, "fsdp")
  assert layers["moe"]["gate"] == P(None, "expert", "fsdp", "tensor")
  assert layers["moe"]["up"] == P(None, "expert", "fsdp", "tensor")
  assert layers["moe"]["down"] == P(None, "expert", "tensor", "fsdp")
  assert layers["attn"]["q"] == P(None, "fsdp", "tensor")  # the rest as without experts


def test_golden_partition_specs_llama3_8b():
  specs = _specs("configs/llama3_8b.py", (1, 4, 2))
  layers = specs["layers"]
  assert specs["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"] == P("fsdp", "tensor")
  assert layers["attn"]["q"] == P(None, "fsdp", "tensor")
  assert layers["attn"]["k"] == P(None, "fsdp", "tensor")
  assert layers["attn"]["v"] == P(None, "fsdp", "tensor")
  assert layers["attn"]["o"] == P(None, "tensor", None, "fsdp")
  assert layers["mlp"]["up"] == P(None, "fsdp", "tensor")
  assert layers["mlp"]["down"] == P(None, "tensor", "fsdp")
  assert layers["mlp_norm"]["scale"] == P()


def test_schedule_warmup_then_cosine():
  cfg = small_config(warmup_steps=10, steps=110, lr=1.0, min_lr_ratio=0.1, decay="cosine")
  sched = optim.learning_rate_schedule(cfg.train)
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(sched(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # cosine midpoint
  np.testing.assert_allclose(sched(110), 0.1, atol=1e-6)


def test_weight_decay_skips_norms():
  params = {"embedding": jnp.ones((4, 2)), "layers": {"attn_norm": {"scale": jnp.ones((3, 2))},
                                                      "mlp": {"up": jnp.ones((3, 2, 2))}}}
  mask = optim.decay_mask(params)
  assert mask == {"embedding": True, "layers": {"attn_norm": {"scale": False},
                                                "mlp": {"up": True}}}


def test_clipping_bounds_the_update():
  cfg = small_config(grad_clip=1.0, weight_decay=0.0, b1=0.0, b2=0.0, eps=0.0, warmup_steps=0,
                     decay="constant", lr=1.0)
  tx = optim.make_optimizer(cfg.train)
  params = {"w": jnp.zeros((3,))}
  grads = {"w": jnp.array([30.0, 40.0, 0.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Clipped to norm 1, then Adam with b1 = b2 = 0 normalises each coordinate to its sign.
  np.testing.assert_allclose(optax.tree.norm(grads), 50.0)
  np.testing.assert_allclose(updates["w"][:2], [-1.0, -1.0], atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_pallas_attention_trains_like_xla(single_device_run, shape):
  # The flash kernels (interpreted on CPU), run per shard under shard_map on a mesh.
  ref_losses, _ = single_device_run
  cfg = small_config()
  with cfg.unlocked():
    cfg.model.attention_impl = "pallas"
  devices = jax.devices()[:int(np.prod(shape))]
  losses, _ = run_steps(cfg, sharding.make_mesh(*shape, devices=devices),
                        [random_batch(seed=s) for s in range(3)])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_nonfinite_step_changes_nothing(scale):
  """A step whose loss and gradient are not finite keeps the parameters and optimizer state
  (train.on_nonfinite: the loop then stops or skips), and counts itself."""
  from train.state import TrainState
  tx = optax.adam(0.1)

  def loss_fn(params, frozen, batch):
    loss = jnp.sum(params["w"] ** 2) * batch["scale"]
    return loss, {"loss": loss, "count": jnp.float32(1)}

  train_step = jax.jit(step_lib.make_train_step(loss_fn, tx, microbatches=1, mesh=None,
                                                param_shardings=None))
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     rng=jnp.zeros(2, jnp.uint32))
  bad, m_bad = train_step(state, {"scale": jnp.float32(scale)})
  assert int(bad.step) == 1 and int(m_bad["nonfinite"]) == 1
  jax.tree.map(np.testing.assert_array_equal, (bad.params, bad.opt_state),
               (state.params, state.opt_state))
  good, m_good = train_step(bad, {"scale": jnp.float32(1)})
  assert int(m_good["nonfinite"]) == 0
  np.testing.assert_allclose(good.params["w"], [0.9, -1.9, 2.9], atol=1e-6)  # Adam's first step
