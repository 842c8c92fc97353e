"""The MoE layer against a per-token numpy loop: routing, experts, capacity, router losses;
and expert parallelism (a mesh with an expert axis) against one device."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from model import moe as moe_lib, sharding
from model.config import ModelConfig
from model.moe import moe
from model.transformer import _init_tree, layer_specs
from pallas_kernels.grouped_matmul import grouped_matmul

D, F, B, T = 16, 32, 2, 5
# moe_impl values, and the grouped-matmul kernels run interpreted in the layer ("gmm" is
# ragged_dot on CPU): Triton (GPU) and megablox (TPU).
IMPLS = ["ragged", "dense", "triton", "megablox"]


@pytest.fixture(autouse=True)
def strict_ranks():
  with jax.numpy_rank_promotion("raise"):
    yield


def layer_impl(impl, monkeypatch):
  """The model.moe_impl to configure for `impl`; for a kernel, the layer's grouped matmul is
  that kernel, interpreted."""
  if impl not in ("triton", "megablox"):
    return impl
  kernel = lambda x, w, sizes, impl=None: grouped_matmul(x, w, sizes, impl=kernel.impl,
                                                         interpret=True)
  kernel.impl = impl
  monkeypatch.setattr(moe_lib, "grouped_matmul", kernel)
  return "gmm"


def make(e=4, k=2, seed=0, **kw):
  cfg = ModelConfig(d_model=D, d_ff=F, n_experts=e, n_experts_per_token=k, **kw)
  rng = np.random.default_rng(seed)
  params = {"router": rng.normal(size=(D, e)), "gate": rng.normal(size=(e, D, F)) / 4,
            "up": rng.normal(size=(e, D, F)) / 4, "down": rng.normal(size=(e, F, D)) / 6}
  params = {name: w.astype(np.float32) for name, w in params.items()}
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  return cfg, params, x


def apply(cfg, params, x, mask=None):
  return moe(cfg, params, jnp.asarray(x), mask)


def softmax(z):
  z = np.exp(z - z.max())
  return z / z.sum()


def reference(cfg, params, x, mask=None):
  """(y [B, T, D], dropped, f [E], P [E], z-loss) token by token, in float64."""
  p64 = {name: w.astype(np.float64) for name, w in params.items()}
  e, k = cfg.n_experts, cfg.n_experts_per_token
  xs = x.reshape(-1, D).astype(np.float64)
  valid = np.ones(len(xs), bool) if mask is None else np.asarray(mask).reshape(-1)
  capacity = math.ceil(cfg.capacity_factor * len(xs) * k / e) if cfg.capacity_factor else None
  y, taken, counts = np.zeros_like(xs), np.zeros(e, int), np.zeros(e)
  probs, lse, dropped = [], [], 0
  for i, xi in enumerate(xs):
    logits = xi @ p64["router"]
    p = softmax(logits)
    top = np.argsort(-logits)[:k]
    if cfg.router == "mixtral":
      w = softmax(logits[top])
    else:
      w = p[top] / (p[top].sum() if cfg.norm_topk_prob else 1.0)
    if not valid[i]:
      continue
    probs.append(p)
    lse.append(np.log(np.exp(logits).sum()))
    for wj, ex in zip(w, top):
      counts[ex] += 1
      taken[ex] += 1
      if capacity is not None and taken[ex] > capacity:
        dropped += 1
        continue
      gate, up = xi @ p64["gate"][ex], xi @ p64["up"][ex]
      y[i] += wj * ((gate / (1 + np.exp(-gate)) * up) @ p64["down"][ex])
  n = valid.sum()
  return (y.reshape(x.shape), dropped, counts / (n * k), np.mean(probs, axis=0),
          np.mean(np.square(lse)))


@pytest.mark.parametrize("router,norm", [("mixtral", True), ("mixtral", False),
                                         ("qwen3_moe", True), ("qwen3_moe", False)])
@pytest.mark.parametrize("e", [4, 8])
@pytest.mark.parametrize("impl", IMPLS)
def test_output_matches_per_token_loop(router, norm, e, impl, monkeypatch):
  cfg, params, x = make(e=e, router=router, norm_topk_prob=norm,
                        moe_impl=layer_impl(impl, monkeypatch))
  y, aux = apply(cfg, params, x)
  y_ref, *_ = reference(cfg, params, x)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  assert int(aux.dropped) == 0


@pytest.mark.parametrize("router", ["mixtral", "qwen3_moe"])
def test_output_with_k_1_and_k_equal_to_e(router):
  for k in (1, 4):
    cfg, params, x = make(e=4, k=k, router=router, norm_topk_prob=False)
    np.testing.assert_allclose(apply(cfg, params, x)[0], reference(cfg, params, x)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_router_losses_by_hand(masked, impl):
  cfg, params, x = make(e=8, seed=1, moe_impl=impl)
  mask = np.ones((B, T), bool)
  if masked:
    mask[0, 3:] = mask[1, 4:] = False  # right padding
  y, aux = apply(cfg, params, x, mask if masked else None)
  y_ref, _, f, p, z = reference(cfg, params, x, mask)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  assert not np.any(np.asarray(y)[~mask])  # padding gets no expert output
  np.testing.assert_allclose(aux.expert_load, f, rtol=1e-6)
  np.testing.assert_allclose(aux.load_balancing_loss, 8 * np.sum(f * p), rtol=1e-5)
  np.testing.assert_allclose(aux.z_loss, z, rtol=1e-5)
  assert abs(float(jnp.sum(aux.expert_load)) - 1) < 1e-6


def test_uniform_router_balances_to_one():
  cfg, params, x = make(e=4)
  params["router"] = np.zeros_like(params["router"])  # every probability 1/E
  _, aux = apply(cfg, params, x)
  # P_i = 1/E for every expert, and the f_i sum to 1, so E * sum f_i P_i = 1 whatever f is.
  np.testing.assert_allclose(aux.load_balancing_loss, 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux.z_loss, np.log(4) ** 2, rtol=1e-6)


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_capacity_drops_the_latest_assignments(factor, masked, impl):
  cfg, params, x = make(e=4, seed=2, capacity_factor=factor, moe_impl=impl)
  params["router"][:, 0] += 2 * x.reshape(-1, D).mean(0)  # crowd expert 0
  mask = np.ones((B, T), bool)
  if masked:
    mask[0, :2] = False  # masked tokens come first: they must not take capacity
  y, aux = apply(cfg, params, x, mask if masked else None)
  y_ref, dropped, *_ = reference(cfg, params, x, mask)
  if factor < 1:
    assert dropped > 0
  assert int(aux.dropped) == dropped
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  dropless, aux0 = apply(dataclasses.replace(cfg, capacity_factor=0.0), params, x,
                         mask if masked else None)
  assert int(aux0.dropped) == 0
  if dropped:
    assert not np.allclose(dropless, y)


@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_router_gets_gradients_from_output_and_aux_losses(impl):
  cfg, params, x = make(e=4, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
                        moe_impl=impl)
  params = jax.tree.map(jnp.asarray, params)

  def loss(params, aux_only):
    y, aux = moe(cfg, params, jnp.asarray(x))
    return aux.loss(cfg) + (0.0 if aux_only else jnp.mean(y ** 2))

  for aux_only in (False, True):
    grads = jax.grad(loss)(params, aux_only)
    assert np.all(np.isfinite(grads["router"])) and np.any(np.asarray(grads["router"]) != 0)
  grads = jax.grad(loss)(params, False)
  for name in ("gate", "up", "down"):
    assert np.any(np.asarray(grads[name]) != 0)
  # The aux loss's router gradient matches a finite difference (f_i is piecewise constant).
  direction = np.random.default_rng(3).normal(size=params["router"].shape).astype(np.float32)
  aux_loss = lambda r: loss({**params, "router": r}, True)
  eps = 1e-3
  fd = (aux_loss(params["router"] + eps * direction)
        - aux_loss(params["router"] - eps * direction)) / (2 * eps)
  g = jax.grad(aux_loss)(params["router"])
  np.testing.assert_allclose(np.sum(np.asarray(g) * direction), fd, rtol=2e-2)


def test_jit_and_bf16():
  cfg, params, x = make(e=8, router="qwen3_moe")
  x = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))  # same routing input
  run = jax.jit(lambda p, x: moe(cfg, p, x))
  y, aux = run(params, x)
  y_ref, *_ = reference(cfg, params, x)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)

  cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
  y16, aux16 = jax.jit(lambda p, x: moe(cfg16, p, x))(
      params, jnp.asarray(x, jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y16, np.float32)))
  np.testing.assert_allclose(np.asarray(y16, np.float32), y_ref, atol=0.05 * np.abs(y_ref).max())
  np.testing.assert_allclose(aux16.load_balancing_loss, aux.load_balancing_loss, rtol=1e-4)


def test_under_a_mesh_the_expert_axis_is_replicated():
  cfg, params, x = make(e=4)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  boxed = jax.eval_shape(lambda: _init_tree(layer_specs(cfg)["moe"], jax.random.key(0),
                                            jnp.float32))
  specs = {n: s.spec for n, s in sharding.shardings_for(boxed, mesh).items()}
  assert specs == {"router": jax.P("fsdp"), "gate": jax.P(None, "fsdp", "tensor"),
                   "up": jax.P(None, "fsdp", "tensor"), "down": jax.P(None, "tensor", "fsdp")}
  y, _ = jax.jit(sharding.in_mesh(lambda p, x: moe(cfg, p, x), mesh))(
      params, x)
  np.testing.assert_allclose(y, reference(cfg, params, x)[0], atol=1e-5, rtol=1e-5)


def test_expert_weights_are_split_over_the_expert_axis():
  cfg, _, _ = make(e=4)
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, expert=2)
  boxed = jax.eval_shape(lambda: _init_tree(layer_specs(cfg)["moe"], jax.random.key(0),
                                            jnp.float32))
  specs = {n: s.spec for n, s in sharding.shardings_for(boxed, mesh).items()}
  assert specs == {"router": jax.P("fsdp"), "gate": jax.P("expert", "fsdp", "tensor"),
                   "up": jax.P("expert", "fsdp", "tensor"),
                   "down": jax.P("expert", "tensor", "fsdp")}


# (data, fsdp, expert, tensor), batch rows, capacity factor. With 2 rows on a (1, 1, 4, 2) mesh
# the batch cannot be split: every expert shard sees all tokens, and the outputs are summed.
EP_CASES = [((2, 2, 2, 1), 8, 0.0), ((1, 2, 4, 1), 8, 0.5), ((1, 1, 4, 2), 2, 0.5)]


@pytest.mark.parametrize("shape,b,factor", EP_CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_expert_parallel_matches_one_device(shape, b, factor, impl, monkeypatch):
  """Output, router statistics, dropped count and gradients (weights and input) on an
  expert-parallel mesh equal one device's, with padding and capacity drops. (Each device's
  grouped matmul has rows past its groups: the assignments of other devices' experts.)"""
  cfg, np_params, _ = make(e=8, seed=4, moe_impl=layer_impl(impl, monkeypatch),
                           capacity_factor=factor,
                           router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(b, T, D)).astype(np.float32)
  mask = np.ones((b, T), bool)
  mask[0, 3:] = mask[-1, :1] = False
  params = jax.tree.map(jnp.asarray, np_params)

  def loss(params, x):
    y, aux = moe(cfg, params, x, mask)
    return jnp.sum(jnp.sin(y)) + aux.loss(cfg), (y, aux)

  step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, (y1, aux1)), grads1 = jax.jit(step)(params, x)
  data, fsdp, expert, tensor = shape
  mesh = sharding.make_mesh(data, fsdp, tensor, expert=expert)
  (_, (y, aux)), grads = jax.jit(sharding.in_mesh(step, mesh))(params, x)
  np.testing.assert_allclose(y, reference(cfg, np_params, x, mask)[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y, y1, atol=2e-6, rtol=1e-6)
  if factor:
    assert int(aux1.dropped) > 0
  assert int(aux.dropped) == int(aux1.dropped)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), aux, aux1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               grads, grads1)


def test_experts_must_divide_over_the_expert_axis():
  cfg, params, x = make(e=6)
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=1, expert=4)
  with pytest.raises(ValueError, match=r"model\.n_experts=6 .*mesh\.expert=4"):
    jax.jit(sharding.in_mesh(lambda p, x: moe(cfg, p, x), mesh)).lower(params, x)


def test_config_keys_and_checks():
  # configs/base.py sets every new key to the dataclass default: existing models stay dense.
  assert ModelConfig.from_config(base.get_config().model) == ModelConfig()
  assert ModelConfig().n_experts == 0
  with pytest.raises(ValueError, match="model.router"):
    ModelConfig(n_experts=4, router="switch")
  with pytest.raises(ValueError, match="model.n_experts_per_token"):
    ModelConfig(n_experts=4, n_experts_per_token=5)


def test_the_decoder_runs_its_experts_and_sows_their_statistics():
  """n_experts > 0 puts the MoE in every block: its output changes the logits, and the
  router statistics come out as intermediates (averaged over layers)."""
  with jax.numpy_rank_promotion("allow"):  # the decoder broadcasts its scales
    _decoder_with_experts()


def _decoder_with_experts():
  from model import Transformer
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32,
                    n_experts=4, capacity_factor=0.5)
  tokens = jnp.arange(8)[None] % 32
  params = Transformer(cfg).init(jax.random.key(0), tokens, tokens)["params"]
  assert "moe" in params["layers"] and "mlp" not in params["layers"]
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  (logits, _), state = Transformer(cfg).apply({"params": params}, tokens, tokens,
                                              mutable=["intermediates"])
  aux = state["intermediates"]["moe"][0]
  assert aux.expert_load.shape == (4,) and aux.dropped > 0
  np.testing.assert_allclose(float(jnp.sum(aux.expert_load)), 1.0, rtol=1e-6)
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["layers"]["moe"]["down"] = jnp.zeros_like(params["layers"]["moe"]["down"])
  other, _ = Transformer(cfg).apply({"params": zeroed}, tokens, tokens)
  assert not np.allclose(logits, other)
