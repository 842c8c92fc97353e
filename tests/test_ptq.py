"""GPTQ and AWQ on one layer (model/ptq.py) against numpy written here: GPTQ as the paper's
column loop in float64, the output error against round-to-nearest (model/quant.py), lazy batches
against none, AWQ's scaled layer and its scale folded into an RMSNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ptq, quant

K, N, M = 128, 96, 512
pytestmark = pytest.mark.usefixtures("quick_compiles")


def _calibration(m=M, k=K, seed=0, dead=()):
  """Correlated, heavy-tailed inputs (Student t through a random mixing) with a few outlier
  channels, the kind LLM activations have and both methods gain from."""
  rng = np.random.default_rng(seed)
  x = rng.standard_t(4, size=(m, k)) @ (np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k))
  x *= np.exp(0.5 * rng.standard_normal(k))
  x[:, rng.choice(k, 4, replace=False)] *= 15.0
  x[:, list(dead)] = 0.0
  return x.astype(np.float32)


def _weight(k=K, n=N, seed=1):
  return (0.02 * np.random.default_rng(seed).standard_normal((k, n))).astype(np.float32)


@jax.jit
def _unpacked(q):
  return q.codes(), q.astype(jnp.float32)


def _codes(q):
  return np.asarray(_unpacked(q)[0])


def _deq(q):
  return np.asarray(_unpacked(q)[1], np.float64)


def _output_error(x, w, w_hat):
  x = np.asarray(x, np.float64)
  return np.linalg.norm(x @ np.asarray(w, np.float64) - x @ w_hat)


# ------------------------------------------------------ GPTQ, Frantar et al. 2022, in float64

def _np_stats(rows, kind, symmetric):
  """Scale and zero [N] of a group of rows [g, N], model/quant.py's formulas."""
  if kind == "nf4":
    s = np.abs(rows).max(0)
    return np.where(s > 0, s, 1.0), np.zeros_like(s)
  if symmetric:
    s = np.abs(rows).max(0) / (127 if kind == "int8" else 7)
    return np.where(s > 0, s, 1.0), np.zeros_like(s)
  lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
  s = (hi - lo) / 15
  s = np.where(s > 0, s, 1.0)
  return s, np.clip(np.round(-lo / s), 0, 15)


def _np_round(w, s, z, kind, symmetric):
  if kind == "nf4":
    c = np.abs((w / s)[:, None] - quant.NF4.astype(np.float64)).argmin(-1)
    return c, quant.NF4[c].astype(np.float64) * s
  if symmetric:
    top = 127 if kind == "int8" else 7
    c = np.clip(np.round(w / s), -top, top)
    return c, c * s
  c = np.clip(np.round(w / s) + z, 0, 15)
  return c, (c - z) * s


def gptq_numpy(w, x, kind, group, symmetric=True, damp=0.01, act_order=False):
  """The paper's Alg. 1 without lazy batches: H = 2 X^T X, dead inputs, dampening,
  U = cholesky(inverse(H)) upper, one input row at a time. Returns (codes, dequantized)."""
  w, x = np.asarray(w, np.float64).copy(), np.asarray(x, np.float64)
  k = w.shape[0]
  group = group or k
  h = 2 * x.T @ x
  dead = np.diagonal(h) == 0
  h[dead, dead] = 1
  w[dead] = 0
  perm = np.argsort(-np.diagonal(h), kind="stable") if act_order else np.arange(k)
  if act_order:  # static groups: scales of the original groups of the unquantized W
    static = [_np_stats(w[j:j + group], kind, symmetric) for j in range(0, k, group)]
  h += damp * np.mean(np.diagonal(h)) * np.eye(k)
  h, w = h[np.ix_(perm, perm)], w[perm]
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  codes, deq = np.zeros_like(w), np.zeros_like(w)
  for i in range(k):
    if act_order:
      s, z = static[perm[i] // group]
    elif i % group == 0:  # from the rows as moved by the errors so far
      s, z = _np_stats(w[i:i + group], kind, symmetric)
    codes[i], deq[i] = _np_round(w[i], s, z, kind, symmetric)
    err = (w[i] - deq[i]) / u[i, i]
    w[i:] -= np.outer(u[i, i:], err)
  unperm = np.argsort(perm)
  return codes[unperm], deq[unperm]


@pytest.mark.parametrize("kind,group,symmetric,act_order", [
    ("int8", 0, True, False), ("int4", 32, True, False), ("int4", 64, False, False),
    ("nf4", 32, True, False), ("int4", 32, False, True)])
def test_gptq_is_the_papers_algorithm(kind, group, symmetric, act_order):
  x, w = _calibration(dead=(5,)), _weight()
  q = ptq.gptq(w, x, kind, group, symmetric=symmetric, act_order=act_order)
  codes_ref, deq_ref = gptq_numpy(w, x, kind, group, symmetric, act_order=act_order)
  codes, deq = _codes(q).astype(np.float64), _deq(q)
  # f32 against f64: a code can round the other way at a tie, and the different error it leaves
  # moves the rest of that output column; the other columns are the same.
  same_columns = np.all(codes == codes_ref, axis=0)
  assert np.mean(codes == codes_ref) > 0.99 and same_columns.mean() > 0.9
  np.testing.assert_allclose(deq[:, same_columns], deq_ref[:, same_columns], rtol=1e-4, atol=1e-6)
  assert np.all(deq[5] == 0)  # the dead input's row


@pytest.mark.parametrize("kind,group,symmetric", [
    ("int4", 32, True), ("int4", 64, True), ("int4", 64, False), ("int8", 0, True)])
def test_gptq_output_error_below_round_to_nearest(kind, group, symmetric):
  x, w = _calibration(seed=2), _weight(seed=3)
  rtn = _output_error(x, w, _deq(quant.quantize(w, kind, group, symmetric=symmetric)))
  err = _output_error(x, w, _deq(ptq.gptq(w, x, kind, group, symmetric=symmetric)))
  assert err <= rtn
  if kind == "int4":
    assert err < 0.8 * rtn


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
  """No correlation between inputs: U is diagonal and no error moves (also an expert that no
  calibration token reached, whose Hessian is 0)."""
  w = _weight()
  for h in (np.eye(K), np.zeros((K, K))):
    q = ptq.gptq(w, ptq.Hessian(jnp.asarray(h, jnp.float32)), "int4", 64, symmetric=False)
    np.testing.assert_array_equal(_codes(q), _codes(quant.quantize(w, "int4", 64, symmetric=False)))


@pytest.mark.parametrize("kind,group,blocks", [("int4", 32, (16, 96)), ("int8", 0, (48,))])
def test_lazy_batches_equal_one_block(kind, group, blocks):
  """Against one block of all K rows: blocks of 16 rows (inside a group), 96 (whole groups, K
  padded to 192), 48 (per channel, K padded to 144)."""
  x, w = _calibration(seed=4), _weight(seed=5)
  h = ptq.hessian(x)
  full = ptq.gptq(w, h, kind, group, block=K)
  for block in blocks:
    q = ptq.gptq(w, h, kind, group, block=block)
    assert np.mean(_codes(q) == _codes(full)) > 0.995
    assert np.mean(np.isclose(_deq(q), _deq(full), rtol=1e-5, atol=1e-7)) > 0.995


def test_many_blocks_match_the_papers_algorithm():
  """K = 256 in blocks of 8 (32 blocks, in 4 loops: model/ptq.py's phases) and of 16 (two
  groups a block, in 2 loops)."""
  k = 256
  x, w = _calibration(k=k, seed=15), _weight(k=k, seed=16)
  codes_ref, deq_ref = gptq_numpy(w, x, "int4", 8)
  for block in (8, 16):
    q = ptq.gptq(w, x, "int4", 8, block=block)
    same = _codes(q) == codes_ref
    assert same.mean() > 0.99
    np.testing.assert_allclose(_deq(q)[same], deq_ref[same], rtol=1e-4, atol=1e-6)


def test_gptq_hessians_add_up_over_batches():
  x, w = _calibration(seed=6), _weight(seed=7)
  h = sum(ptq.hessian(x[i:i + 128]) for i in range(0, M, 128))
  full = np.asarray(ptq.hessian(x).h)
  np.testing.assert_allclose(h.h, full, rtol=0, atol=1e-5 * np.abs(full).max())
  np.testing.assert_array_equal(_codes(ptq.gptq(w, h, "int8")), _codes(ptq.gptq(w, x, "int8")))


def test_gptq_experts_and_input_axes():
  """Experts [E, D, F] each with its own Hessian [E, D, D]; o [N, H, D] with its two input axes
  is the [N * H, D] matrix."""
  e = 3
  xs = np.stack([_calibration(m=256, seed=10 + i) for i in range(e)])
  ws = np.stack([_weight(seed=20 + i) for i in range(e)])
  q = ptq.gptq(ws, ptq.hessian(xs, n_batch=1), "int4", 32, n_batch=1)
  assert q.shape == ws.shape and q.scales.shape == (e, K // 32, N)
  for i in range(e):
    np.testing.assert_array_equal(_codes(q)[i], _codes(ptq.gptq(ws[i], xs[i], "int4", 32)))
  o = ptq.gptq(_weight().reshape(8, 16, N), _calibration().reshape(M, 8, 16), "int4", 32,
               n_in=2)
  flat = ptq.gptq(_weight(), _calibration(), "int4", 32)
  np.testing.assert_array_equal(_codes(o).reshape(K, N), _codes(flat))
  np.testing.assert_array_equal(_deq(o).reshape(K, N), _deq(flat))


# ----------------------------------------------------------------------- AWQ, Lin et al. 2023

def _awq_error(x, w, q, s):
  """||x W - (x / s) Q(W s)|| in float64, the layer as it will run."""
  x = np.asarray(x, np.float64)
  return np.linalg.norm(x @ np.asarray(w, np.float64) - (x / np.asarray(s, np.float64)) @ _deq(q))


def test_awq_output_error_below_round_to_nearest():
  x, w = _calibration(seed=8), _weight(seed=9)
  q, s = ptq.awq(w, x, "int4", 64)
  rtn = _awq_error(x, w, quant.quantize(w, "int4", 64, symmetric=False), np.ones(K))
  assert s.shape == (K,) and not np.allclose(s, 1.0)
  assert _awq_error(x, w, q, s) < 0.9 * rtn
  # The chosen s is the best of the grid, on this error.
  for alpha in (0.25, 0.5, 0.75):
    s_a = np.abs(x).mean(0) ** alpha
    s_a = s_a / np.sqrt(s_a.max() * s_a.min())
    q_a = quant.quantize(w * s_a[:, None], "int4", 64, symmetric=False)
    assert _awq_error(x, w, q, s) <= _awq_error(x, w, q_a, s_a) * (1 + 1e-5)


def test_awq_alpha_zero_is_round_to_nearest():
  x, w = _calibration(), _weight()
  q, s = ptq.awq(w, x, "int4", 64, grid=1)  # the grid {0}
  np.testing.assert_array_equal(s, np.ones(K))
  rtn = quant.quantize(w, "int4", 64, symmetric=False)
  np.testing.assert_array_equal(q.values, rtn.values)
  np.testing.assert_array_equal(q.scales, rtn.scales)
  np.testing.assert_array_equal(q.zeros, rtn.zeros)


def test_awq_shared_input_one_scale():
  x = _calibration(seed=11)
  wq, wk = _weight(seed=12), _weight(n=32, seed=13)
  (qq, qk), s = ptq.awq_shared([wq, wk], x, "int4", 64)
  both = _awq_error(x, wq, qq, s) ** 2 + _awq_error(x, wk, qk, s) ** 2
  rtn = sum(_awq_error(x, w, quant.quantize(w, "int4", 64, symmetric=False), np.ones(K)) ** 2
            for w in (wq, wk))
  assert both < rtn
  q1, s1 = ptq.awq(wq, x, "int4", 64)
  (q2,), s2 = ptq.awq_shared([wq], x, "int4", 64)
  np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("plus_one", [False, True])
def test_fold_into_norm(plus_one):
  """norm(x) @ W equals norm'(x) @ (W * s) with s folded into the norm's scale."""
  rng = np.random.default_rng(14)
  h = rng.standard_normal((32, K)).astype(np.float32)
  g = (0.1 * rng.standard_normal(K) + (0.0 if plus_one else 1.0)).astype(np.float32)
  w = _weight()
  s = np.exp(0.5 * rng.standard_normal(K)).astype(np.float32)

  def norm(x, scale):
    y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    return y * (1 + scale if plus_one else scale)

  g2 = np.asarray(ptq.fold_into_norm(g, s, plus_one))
  np.testing.assert_allclose(norm(h, g2) @ (w * s[:, None]), norm(h, g) @ w, rtol=1e-4,
                             atol=1e-5)


def test_bad_input_is_named():
  x, w = _calibration(), _weight()
  with pytest.raises(ValueError, match="group 48 does not divide the input size 128"):
    ptq.gptq(w, x, "int4", 48)
  with pytest.raises(ValueError, match="group 48 does not divide the input size 128"):
    ptq.awq(w, x, "int4", 48)
  with pytest.raises(ValueError, match="'int3' is not one of"):
    ptq.gptq(w, x, "int3")
  with pytest.raises(ValueError, match="'int3' is not one of"):
    ptq.awq(w, x, "int3")
  with pytest.raises(ValueError, match=r"calibration inputs of shape \(512, 100\)"):
    ptq.gptq(w, x[:, :100], "int8")
  with pytest.raises(ValueError, match=r"calibration inputs of shape \(512, 100\)"):
    ptq.awq(w, x[:, :100], "int4", 64)
  with pytest.raises(ValueError, match=r"Hessian has shape \(100, 100\)"):
    ptq.gptq(w, ptq.hessian(x[:, :100]), "int8")
  with pytest.raises(ValueError, match="asymmetric quantization is for int4, not int8"):
    ptq.gptq(w, x, "int8", symmetric=False)


def test_awq_clip_lowers_each_groups_output_error_in_numpy():
  """Clipping picks, per (group, output), the range whose rounding error reaches the output
  least; against no clipping, measured in float64 numpy on the same inputs."""
  rng = np.random.default_rng(3)
  K, N, G = 128, 24, 32
  w = rng.standard_normal((K, N)).astype(np.float32)
  w[rng.integers(0, K, 6), rng.integers(0, N, 6)] *= 8.0  # outliers widen their groups' range
  x = rng.standard_normal((256, K)).astype(np.float32)
  clipped = np.asarray(ptq.awq_clip(w, x, "int4", G, symmetric=True))
  assert np.all(np.abs(clipped) <= np.abs(w) + 1e-6)  # it only ever shrinks values
  def group_errors(v):
    q = np.asarray(quant.quantize(v, "int4", G).astype(np.float32), np.float64)
    d = (w.astype(np.float64) - q).reshape(K // G, G, N)
    return np.square(np.einsum("mgk,gkn->mgn", x.reshape(-1, K // G, G), d)).sum(0)
  plain, clip = group_errors(w), group_errors(clipped)
  assert np.all(clip <= plain * (1 + 1e-4))
  assert clip.sum() < 0.95 * plain.sum()
  assert not np.array_equal(clipped, w)
