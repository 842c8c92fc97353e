"""LoRA on parameter trees (model/lora.py) against numpy float64 and the unadapted model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model import ModelConfig, Transformer, lora, sharding, transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=32)
RANK, ALPHA = 4, 8.0
# (module, in dims) of each projection, as in model/layers.py.
IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
MODULE = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp",
          "down": "mlp"}


def _cfg(scan: bool) -> ModelConfig:
  return dataclasses.replace(CFG, scan_layers=scan)


def _init(cfg: ModelConfig):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens)["params"]


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def model(request):
  cfg = _cfg(request.param)
  return cfg, nn.unbox(jax.jit(lambda: _init(cfg))())


def _forward(cfg, params, tokens):
  b, t = tokens.shape
  return transformer.forward(cfg, params, tokens, jnp.broadcast_to(jnp.arange(t), (b, t)))[0]


def _tokens():
  return jax.random.randint(jax.random.PRNGKey(5), (2, 7), 0, CFG.vocab_size)


def _layer_paths(cfg):
  return [("layers",)] if cfg.scan_layers else [(f"layers_{i}",) for i in range(cfg.n_layers)]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _random_b(adapters, seed=3):
  """Nonzero B (the zero init would make every test of the update trivial)."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in
                                      zip(keys, leaves)])


def test_zero_b_leaves_logits_unchanged(model):
  cfg, params = model
  adapters = lora.init_adapters(params, targets=lora.TARGETS, rank=RANK,
                                rng=jax.random.PRNGKey(1))
  for layer in _layer_paths(cfg):
    for name in lora.TARGETS:
      pair = _get(adapters, layer + (MODULE[name], name))
      assert np.all(np.asarray(pair["b"]) == 0) and np.any(np.asarray(pair["a"]) != 0)
  merged = jax.jit(lambda p, a: lora.merge(p, a, rank=RANK, alpha=ALPHA))(params, adapters)
  tokens = _tokens()
  np.testing.assert_array_equal(np.asarray(_forward(cfg, merged, tokens)),
                                np.asarray(_forward(cfg, params, tokens)))


def test_merge_is_w_plus_scaled_low_rank_product(model):
  cfg, params = model
  adapters = _random_b(lora.init_adapters(params, targets="q, o,down,gate", rank=RANK,
                                          rng=jax.random.PRNGKey(1)))
  merged = lora.merge(params, adapters, rank=RANK, alpha=ALPHA)
  s = ALPHA / RANK
  rng = np.random.default_rng(0)
  for layer in _layer_paths(cfg):
    for name in lora.TARGETS:
      path = layer + (MODULE[name], name)
      w = np.asarray(_get(params, path), np.float64)
      if name not in ("q", "o", "down", "gate"):
        assert _get(merged, path) is _get(params, path)  # untouched: the same array
        continue
      a = np.asarray(_get(adapters, path)["a"], np.float64)
      b = np.asarray(_get(adapters, path)["b"], np.float64)
      lead = 1 if cfg.scan_layers else 0
      n_in = IN_DIMS[name]
      in_shape, out_shape = w.shape[lead:lead + n_in], w.shape[lead + n_in:]
      assert a.shape == w.shape[:lead] + in_shape + (RANK,)
      assert b.shape == w.shape[:lead] + (RANK,) + out_shape
      got = np.asarray(_get(merged, path), np.float64)
      assert _get(merged, path).dtype == _get(params, path).dtype
      # The adapter forward (Hu et al. 2021, eq. 3): h = x W + s (x A) B, inputs flattened.
      i_flat, o_flat = int(np.prod(in_shape)), int(np.prod(out_shape))
      x = rng.standard_normal((5, i_flat))
      for l in range(w.shape[0] if lead else 1):
        sel = (lambda t, l=l: t[l]) if lead else (lambda t: t)
        w_l = sel(w).reshape(i_flat, o_flat)
        a_l, b_l = sel(a).reshape(i_flat, RANK), sel(b).reshape(RANK, o_flat)
        np.testing.assert_allclose(sel(got).reshape(i_flat, o_flat), w_l + s * a_l @ b_l,
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x @ sel(got).reshape(i_flat, o_flat),
                                   x @ w_l + s * (x @ a_l) @ b_l, rtol=1e-5, atol=1e-5)
  for name in ("embedding", "final_norm"):
    assert merged[name] is params[name]


def test_gradients_reach_the_adapters(model):
  cfg, params = model
  adapters = lora.init_adapters(params, targets=("q", "v", "up"), rank=RANK,
                                rng=jax.random.PRNGKey(1))
  tokens = _tokens()

  @jax.jit
  def loss_and_grad(adapters):
    def loss(adapters):
      logits = _forward(cfg, lora.merge(params, adapters, rank=RANK, alpha=ALPHA), tokens)
      logp = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return jax.value_and_grad(loss)(adapters)

  loss0, g = loss_and_grad(adapters)
  assert jax.tree.structure(g) == jax.tree.structure(adapters)  # nothing for the base
  for path, pair in lora.pairs(g):
    # d/dA of s A B vanishes while B = 0; B's gradient is s A^T (dL/dW).
    assert np.all(np.asarray(pair["a"]) == 0), path
    assert np.any(np.asarray(pair["b"]) != 0), path
  stepped = jax.tree.map(lambda p, d: p - 0.5 * d, adapters, g)
  loss1, g1 = loss_and_grad(stepped)
  assert loss1 < loss0
  for path, pair in lora.pairs(g1):
    assert np.any(np.asarray(pair["a"]) != 0), path


def test_boxed_adapters_shard_like_their_weights():
  cfg = _cfg(True)
  abstract = jax.eval_shape(lambda: _init(cfg))
  abstract_adapters = jax.eval_shape(
      lambda: lora.init_adapters(abstract, targets=lora.TARGETS, rank=RANK,
                                 rng=jax.random.PRNGKey(1)))
  q = abstract_adapters["layers"]["attn"]["q"]
  assert isinstance(q["a"], nn.Partitioned)
  assert q["a"].names == ("layers", "embed", None)
  assert q["b"].names == ("layers", None, "heads", "head_dim")

  mesh = sharding.make_mesh(2, 2, 2)  # data, fsdp, tensor
  shardings = sharding.shardings_for(abstract_adapters, mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings)["layers"]
  expected = {
      "attn": {"q": (P(None, "fsdp"), P(None, None, "tensor")),
               "k": (P(None, "fsdp"), P(None, None, "tensor")),
               "v": (P(None, "fsdp"), P(None, None, "tensor")),
               "o": (P(None, "tensor"), P(None, None, "fsdp"))},
      "mlp": {"gate": (P(None, "fsdp"), P(None, None, "tensor")),
              "up": (P(None, "fsdp"), P(None, None, "tensor")),
              "down": (P(None, "tensor"), P(None, None, "fsdp"))},
  }
  for module, projections in expected.items():
    for name, (spec_a, spec_b) in projections.items():
      assert specs[module][name] == {"a": spec_a, "b": spec_b}, (module, name)

  # The sharded init the train state uses: eval_shape -> shardings -> jit(out_shardings).
  init = jax.jit(lambda key: nn.unbox(lora.init_adapters(abstract, targets="q,down", rank=RANK,
                                                         rng=key)),
                 out_shardings={"layers": {"attn": {"q": shardings["layers"]["attn"]["q"]},
                                           "mlp": {"down": shardings["layers"]["mlp"]["down"]}}})
  adapters = init(jax.random.PRNGKey(1))
  assert adapters["layers"]["attn"]["q"]["a"].sharding.spec == P(None, "fsdp")
  assert adapters["layers"]["mlp"]["down"]["b"].sharding.spec == P(None, None, "fsdp")

  # Unrolled layers have no lead axis: the names are the weight's own.
  unrolled = lora.init_adapters(jax.eval_shape(lambda: _init(_cfg(False))), targets="o",
                                rank=RANK, rng=jax.random.PRNGKey(1))
  o = unrolled["layers_1"]["attn"]["o"]
  assert o["a"].names == ("heads", "head_dim", None) and o["b"].names == (None, "embed")


def test_boxed_merge_keeps_the_boxes():
  cfg = _cfg(True)
  boxed = jax.jit(lambda: _init(cfg))()
  adapters = _random_b(nn.unbox(lora.init_adapters(boxed, targets="k", rank=RANK,
                                                   rng=jax.random.PRNGKey(1))))
  merged = lora.merge(boxed, adapters, rank=RANK, alpha=ALPHA)
  k = merged["layers"]["attn"]["k"]
  assert isinstance(k, nn.Partitioned) and k.names == boxed["layers"]["attn"]["k"].names
  plain = lora.merge(nn.unbox(boxed), adapters, rank=RANK, alpha=ALPHA)
  np.testing.assert_array_equal(np.asarray(k.value), np.asarray(plain["layers"]["attn"]["k"]))


def test_bad_arguments_are_errors_for_people():
  params = {"layers": {"attn": {"q": jnp.zeros((3, 2, 2))}}}
  with pytest.raises(ValueError, match="valid targets: q, k, v, o, gate, up, down"):
    lora.init_adapters(params, targets="q,qkv", rank=2, rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="no parameter matches"):
    lora.init_adapters(params, targets="down", rank=2, rng=jax.random.PRNGKey(0))
  assert lora.parse_targets(" q, v ,q") == ("q", "v")
  adapters = lora.init_adapters(params, targets=["q"], rank=2, rng=jax.random.PRNGKey(0))
  assert lora.count(adapters) == 3 * 2 + 2 * 2 * 2
  with pytest.raises(ValueError, match="rank=3 does not match"):
    lora.merge(params, adapters, rank=3, alpha=1.0)


# --------------------------------------------------------------------- unmerged (attach)

def _loss(cfg, params, tokens):
  logp = jax.nn.log_softmax(_forward(cfg, params, tokens)[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_unmerged_equals_merged_forward_and_gradients(model):
  """x W + s (x A) B (attach) against the forward and the adapters' gradients of
  W + s A B (merge), every projection targeted."""
  cfg, params = model
  adapters = _random_b(lora.init_adapters(params, rank=RANK, rng=jax.random.PRNGKey(1)))
  tokens = _tokens()
  run = lambda combine: jax.jit(jax.value_and_grad(
      lambda a: _loss(cfg, combine(params, a, rank=RANK, alpha=ALPHA), tokens)))(adapters)
  (loss_u, grad_u), (loss_m, grad_m) = run(lora.attach), run(lora.merge)
  np.testing.assert_allclose(loss_u, loss_m, rtol=1e-6)
  jax.tree.map(lambda u, m: np.testing.assert_allclose(u, m, rtol=2e-4, atol=1e-6),
               grad_u, grad_m)
  attached = lora.attach(params, adapters, rank=RANK, alpha=ALPHA)
  np.testing.assert_allclose(_forward(cfg, attached, tokens),
                             _forward(cfg, lora.merge(params, adapters, rank=RANK, alpha=ALPHA),
                                      tokens), rtol=1e-5, atol=1e-5)


def test_unmerged_step_holds_no_weight_sized_update():
  """The compiled gradient step of attach needs no temporary of an adapted weight's size
  (merge's holds W + s A B and its cotangent): XLA's own memory plan, on CPU."""
  cfg = dataclasses.replace(CFG, d_model=64, d_ff=4096)
  params = nn.unbox(_init(cfg))
  adapters = lora.init_adapters(params, targets=("gate", "up"), rank=RANK,
                                rng=jax.random.PRNGKey(1))
  tokens = _tokens()

  def temp_bytes(combine):
    step = jax.grad(lambda a, p: _loss(cfg, combine(p, a, rank=RANK, alpha=ALPHA), tokens))
    return jax.jit(step).lower(adapters, params).compile().memory_analysis().temp_size_in_bytes
  weights = 2 * 2 * 64 * 4096 * 4  # gate and up of both layers, f32: 4 MiB
  merged, attached = temp_bytes(lora.merge), temp_bytes(lora.attach)
  # merge also holds W + s A B (4 MiB here) and its cotangent; XLA fuses part of that away.
  assert attached < merged - weights / 2, (merged, attached)


def test_zero_adapters_on_a_quantized_base_give_the_base():
  """QLoRA: B = 0 adapters on an NF4 base (model/quant.py) give the quantized base's logits,
  and the adapters train (nonzero gradient for B) through the frozen quantized weights."""
  from model import quant
  cfg = _cfg(True)
  params = nn.unbox(_init(cfg))
  base = quant.quantize_params(params, "nf4", 32, double_quant=True)
  adapters = lora.init_adapters(params, rank=RANK, rng=jax.random.PRNGKey(1))
  tokens = _tokens()
  attached = lora.attach(base, adapters, rank=RANK, alpha=ALPHA)
  np.testing.assert_allclose(_forward(cfg, attached, tokens), _forward(cfg, base, tokens),
                             rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda a: _loss(cfg, lora.attach(base, a, rank=RANK, alpha=ALPHA),
                                   tokens))(adapters)
  for path, pair in lora.pairs(grads):
    assert np.any(np.asarray(pair["b"]) != 0), path
