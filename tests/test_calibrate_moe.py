"""GPTQ and AWQ of mixture-of-experts blocks (model/calibrate.py): each expert is calibrated on
the calibration rows the router sends it, checked against numpy routing of the MoE input
(top-k of the router logits) and against ptq.gptq / quant.quantize on those rows (both tested
against numpy in tests/test_ptq.py and tests/test_quant.py); an expert no row reaches is
rounded to nearest and counted in the log; the calibrated experts beat RTN on held-out rows."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, calibrate, layers, moe, ptq, quant
from model.transformer import embed

pytestmark = pytest.mark.usefixtures("quick_compiles")

# One block, 5 experts, top-2, groups of 32. The router (below) never picks expert 4.
CFG = ModelConfig(vocab_size=96, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=128,
                  moe_d_ff=64, max_seq_len=64, init_std=0.2, n_experts=5,
                  n_experts_per_token=2, scan_layers=False)
GROUP = 32
IDLE = 4


def _params():
  """A random block with the statistics calibration exploits: correlated embedding channels
  and an MLP norm with heavy-tailed gains (LLM activations' outlier channels). The router is
  [u, -u, v, -v, 0]: its two largest logits are |x.u| and |x.v| > 0, so every token goes to
  one of experts 0, 1 and one of 2, 3, and none to expert 4."""
  tok = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(Transformer(CFG).init(jax.random.PRNGKey(0), tok, tok)["params"])
  rng = np.random.default_rng(0)
  d = CFG.d_model
  mix = np.eye(d) + rng.standard_normal((d, 4)) @ rng.standard_normal((4, d)) / 2
  params["embedding"] = jnp.asarray(np.asarray(params["embedding"]) @ mix, jnp.float32)
  gains = np.exp(0.5 * rng.standard_normal(d))
  gains[rng.choice(d, 3, replace=False)] *= 8.0
  w = params["layers_0"]
  w["mlp_norm"]["scale"] = jnp.asarray(gains, jnp.float32)
  u, v = rng.standard_normal((2, d))
  w["moe"]["router"] = jnp.asarray(np.stack([u, -u, v, -v, np.zeros(d)], 1), jnp.float32)
  return params


PARAMS = _params()
CALIB = jax.random.randint(jax.random.PRNGKey(1), (8, 32), 0, CFG.vocab_size)
HELD_OUT = jax.random.randint(jax.random.PRNGKey(2), (8, 32), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def quantized():
  """method -> (the quantized block, the log's lines)."""
  out = {}
  for method in quant.METHODS:
    lines = []
    q = calibrate.quantize_model(CFG, PARAMS, CALIB, quant.Spec("int4", GROUP, method=method),
                                 log=lines.append)
    out[method] = q["layers_0"], lines
  return out


def _moe_input(w, tokens):
  """The MoE's input [M, D] for tokens through the block's attention and norms in w."""
  x = embed(CFG, PARAMS, tokens)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  rope = layers.rope_tables(positions, CFG)["global"]
  h = layers.attention_layer(CFG, w["attn"], layers.rms_norm(x, w["attn_norm"]["scale"], CFG),
                             rope, None, None, None, False)[0]
  return np.asarray(layers.rms_norm(x + h, w["mlp_norm"]["scale"], CFG), np.float64).reshape(
      -1, CFG.d_model)


def _np_routed(x_MD, router_DE, k=CFG.n_experts_per_token):
  """numpy: the rows of x whose k largest router logits include each expert."""
  top = np.argsort(-(x_MD @ np.asarray(router_DE, np.float64)), axis=1)[:, :k]
  return [x_MD[np.any(top == e, axis=1)] for e in range(router_DE.shape[1])]


def _codes(q):
  return np.asarray(q.codes())


def _deq(q):
  return np.asarray(q.astype(jnp.float32), np.float64)


def _expert(q, e):
  return jax.tree.map(lambda a: a[e], q)


def _silu(x):
  return x / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------ the routed rows

def test_routed_rows_and_their_hessians_match_numpy():
  rng = np.random.default_rng(5)
  cfg = dataclasses.replace(CFG, n_experts=4)
  x = rng.standard_normal((2, 16, cfg.d_model)).astype(np.float32)
  router = rng.standard_normal((cfg.d_model, 4)).astype(np.float32)
  got = calibrate.routed(cfg, jnp.asarray(router), jnp.asarray(x))
  want = _np_routed(x.reshape(-1, cfg.d_model).astype(np.float64), router)
  assert sum(len(r) for r in want) == 2 * 32  # every token twice
  for g, r in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float64), r)
    np.testing.assert_allclose(ptq.hessian(g).h, 2 * r.T @ r, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------- GPTQ

def test_gptq_experts_are_gptq_on_their_routed_rows(quantized):
  """gate and up: ptq.gptq on the MoE input rows routed to the expert (after the quantized
  attention: sequential); down: on the hidden activations of those rows through the quantized
  gate and up, computed in numpy."""
  q, _ = quantized["gptq"]
  w = PARAMS["layers_0"]["moe"]
  np.testing.assert_array_equal(q["moe"]["router"], w["router"])  # unquantized, unchanged
  xs = _np_routed(_moe_input(q, CALIB), w["router"])
  for e in range(IDLE):
    x = xs[e].astype(np.float32)
    for name in ("gate", "up"):
      ref = ptq.gptq(w[name][e], x, "int4", GROUP, act_order=True)
      assert np.mean(_codes(_expert(q["moe"][name], e)) == _codes(ref)) > 0.99, (name, e)
    hidden = (_silu(xs[e] @ _deq(_expert(q["moe"]["gate"], e)))
              * (xs[e] @ _deq(_expert(q["moe"]["up"], e))))
    ref = ptq.gptq(w["down"][e], hidden.astype(np.float32), "int4", GROUP, act_order=True)
    assert np.mean(_codes(_expert(q["moe"]["down"], e)) == _codes(ref)) > 0.99, e


# ----------------------------------------------------------------------------------- AWQ

def test_awq_searches_on_each_experts_routed_rows(monkeypatch):
  """The MoE's one scale search takes each used expert's gate and up with that expert's rows;
  each down search the expert's hidden activations of them (numpy from the routed rows)."""
  calls = []
  real = ptq.awq_scale
  monkeypatch.setattr(calibrate.ptq, "awq_scale",
                      lambda parts, *a, **k: calls.append(parts) or real(parts, *a, **k))
  calibrate.quantize_model(CFG, PARAMS, CALIB, quant.Spec("int4", GROUP, method="awq"))
  w = PARAMS["layers_0"]["moe"]
  xs = _np_routed(_moe_input(PARAMS["layers_0"], CALIB), w["router"])
  shared = [c for c in calls if len(c) == IDLE]  # the experts' gate/up search
  downs = [c for c in calls if len(c) == 1 and c[0][0][0].shape == w["down"].shape[1:]]
  assert len(shared) == 1 and len(downs) == IDLE
  for e, ((gate, up), x) in enumerate(shared[0]):
    np.testing.assert_array_equal(gate, w["gate"][e])
    np.testing.assert_array_equal(up, w["up"][e])
    np.testing.assert_allclose(np.asarray(x, np.float64), xs[e], rtol=1e-5, atol=1e-5)
  for e, (((down,), h),) in enumerate(downs):
    np.testing.assert_array_equal(down, w["down"][e])
    ref = _silu(xs[e] @ np.asarray(w["gate"][e], np.float64)) * (
        xs[e] @ np.asarray(w["up"][e], np.float64))
    np.testing.assert_allclose(np.asarray(h, np.float64), ref, rtol=1e-4, atol=1e-4)


def test_awq_shared_scale_is_the_numpy_search(quantized):
  """s [D] (read back from the folded mlp_norm) is numpy's best of the grid: mean|x| over the
  routed rows, the loss summed over each expert's gate and up on its own rows; the router
  takes W * s and stays unquantized."""
  q, _ = quantized["awq"]
  w = PARAMS["layers_0"]
  s_got = np.asarray(w["mlp_norm"]["scale"], np.float64) / np.asarray(q["mlp_norm"]["scale"])
  xs = _np_routed(_moe_input(w, CALIB), w["moe"]["router"])[:IDLE]
  x_mean = np.abs(np.concatenate(xs)).mean(0)

  def loss(s):
    total = 0.0
    for e, x in enumerate(xs):
      for name in ("gate", "up"):
        wt = np.asarray(w["moe"][name][e], np.float64)
        wq = _deq(quant.quantize((wt * s[:, None]).astype(np.float32), "int4", GROUP))
        total += np.sum(np.square(x @ wt - (x / s) @ wq))
    return total

  grid = []
  for alpha in np.arange(20) / 20:
    s = np.maximum(x_mean ** alpha, 1e-4)
    grid.append(s / np.sqrt(s.max() * s.min()))
  best = grid[int(np.argmin([loss(s) for s in grid]))]
  np.testing.assert_allclose(s_got, best, rtol=1e-4)
  assert not np.allclose(best, 1.0)
  np.testing.assert_allclose(q["moe"]["router"], np.asarray(w["moe"]["router"]) * s_got[:, None],
                             rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------- held out, unrouted

def test_calibrated_experts_beat_rtn_on_held_out_rows(quantized):
  """The MoE layer's output on held-out MoE inputs (the unquantized block's), with each
  method's experts (and, for AWQ, its scaled router and inputs divided by its s)."""
  w = PARAMS["layers_0"]
  x = jnp.asarray(_moe_input(w, HELD_OUT), jnp.float32).reshape(HELD_OUT.shape + (-1,))
  layer = jax.jit(lambda w, x: moe.moe(CFG, w, x)[0])
  ref = layer(w["moe"], x)
  err = {}
  for method, (q, _) in quantized.items():
    s = np.asarray(w["mlp_norm"]["scale"]) / np.asarray(q["mlp_norm"]["scale"])
    err[method] = float(jnp.mean(jnp.square(layer(q["moe"], x / s) - ref)))
  assert err["gptq"] < 0.5 * err["rtn"] and err["awq"] < 0.8 * err["rtn"], err


def test_an_expert_without_rows_is_rounded_to_nearest_and_reported(quantized):
  """Expert 4 gets no calibration row: GPTQ rounds it to nearest; AWQ rounds its gate and up
  times the shared s, and its down plain."""
  w = PARAMS["layers_0"]["moe"]
  rtn = lambda a: _codes(quant.quantize(a, "int4", GROUP))
  q, lines = quantized["gptq"]
  for name in ("gate", "up", "down"):
    np.testing.assert_array_equal(_codes(_expert(q["moe"][name], IDLE)), rtn(w[name][IDLE]))
  q, awq_lines = quantized["awq"]
  s = (np.asarray(PARAMS["layers_0"]["mlp_norm"]["scale"])
       / np.asarray(q["mlp_norm"]["scale"]))[:, None]
  np.testing.assert_array_equal(_codes(_expert(q["moe"]["down"], IDLE)), rtn(w["down"][IDLE]))
  for name in ("gate", "up"):
    same = _codes(_expert(q["moe"][name], IDLE)) == rtn(w[name][IDLE] * s)
    assert same.mean() > 0.999, name  # s read back from the norm: a rare tie may round apart
  for log in (lines, awq_lines):
    assert any("block 1/1 quantized (1 of 5 experts got no calibration tokens" in m
               for m in log), log
    assert any(m.endswith("1 of 5 experts got no calibration tokens (rounded to nearest)")
               for m in log), log
