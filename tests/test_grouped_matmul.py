"""The grouped-matmul kernels vs. jax.lax.ragged_dot and a numpy loop over groups, in Pallas
interpret mode on CPU.

Each case compiles once: a jitted function returns the output and both gradients. The cases
cover empty groups, one group holding every row, groups that straddle tiles, rows past the groups
(which must give 0), D and F that no block divides, A that no row tile divides, bf16 and f32.
The TPU path (JAX's megablox kernels, wrapped for any row count) is checked on the same cases.
tests/test_target_compile_kernels.py compiles the kernels with Triton for H100 and A100 and with
Mosaic for v5e, v5p and v6e.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from closeness import assert_close
from pallas_kernels import paths
from pallas_kernels.grouped_matmul import (BlockSizes, _group_bounds, _work_items,
                                           grouped_matmul, grouped_matmul_reference)

pytestmark = pytest.mark.usefixtures("quick_compiles")

# Relative tolerances: error / max(1, max|reference|).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SMALL = BlockSizes(16, 16, 32, 16, 16, 32)  # many tiles on small shapes


def _numpy_gmm(x, w, group_sizes, dy):
  """y, dx, dw by a loop over groups, in f64."""
  x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
  y, dx, dw = np.zeros(dy.shape), np.zeros(x.shape), np.zeros(w.shape)
  start = 0
  for g, n in enumerate(np.asarray(group_sizes)):
    rows = slice(start, start + n)
    y[rows] = x[rows] @ w[g]
    dx[rows] = dy[rows] @ w[g].T
    dw[g] = x[rows].T @ dy[rows]
    start += n
  return y, dx, dw


def _value_and_grads(**kwargs):
  """jit(x, w, group_sizes, dy) -> (y, dx, dw) of grouped_matmul(**kwargs)."""

  @jax.jit
  def run(x, w, group_sizes, dy):
    y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, group_sizes, **kwargs), x, w)
    return (y, *vjp(dy.astype(y.dtype)))

  return run


def _inputs(a, d, f, e, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((a, d)), dtype)
  w = jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), dtype)
  dy = jnp.asarray(rng.standard_normal((a, f)), jnp.float32)
  return x, w, dy


def test_ragged_dot_reference_by_hand():
  """The reference's semantics on numbers worked out by hand: row 0 in group 0 (x 10), row 1
  in group 1 (x 100), row 2 past the groups (0)."""
  x = jnp.array([[1.0], [2.0], [3.0]])
  w = jnp.array([[[10.0, 1.0]], [[100.0, -1.0]]])
  y = grouped_matmul_reference(x, w, jnp.array([1, 1], jnp.int32))
  np.testing.assert_array_equal(y, [[10.0, 1.0], [200.0, -2.0], [0.0, 0.0]])


# (A, D, F, group_sizes, dtype, blocks): forward and both gradients.
CASES = [
    # Empty groups, groups straddling 16-row tiles, 20 trailing rows; D=40, F=72 not multiples
    # of the blocks (16, 32); A=100 not a multiple of 16.
    (100, 40, 72, (7, 0, 50, 3, 20), jnp.float32, SMALL),
    # One group holds every row (a tile per item, no trailing rows).
    (64, 32, 48, (0, 64, 0), jnp.float32, SMALL),
    # Many small groups (several share a tile), default blocks shrunk to the shape.
    (96, 64, 128, (5, 11, 0, 17, 1, 30, 9, 13), jnp.bfloat16, None),
    # No rows in any group: y, dx and dw all 0.
    (40, 24, 40, (0, 0, 0), jnp.float32, SMALL),
]


def _case_id(c):
  a, d, f, gs, dtype, blocks = c
  blocks = "small" if blocks else "default"
  return f"A{a}-D{d}-F{f}-E{len(gs)}-sum{sum(gs)}-{jnp.dtype(dtype).name}-{blocks}"


@pytest.mark.parametrize("impl", ["triton", "megablox"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_ragged_dot_and_numpy(case, impl):
  """Ours (GPU) and megablox as wrapped for any row count (TPU: pallas_kernels/_gmm_tpu.py)."""
  a, d, f, gs, dtype, blocks = case
  x, w, dy = _inputs(a, d, f, len(gs), dtype)
  group_sizes = jnp.array(gs, jnp.int32)
  got = _value_and_grads(impl=impl, interpret=True, block_sizes=blocks)(x, w, group_sizes, dy)
  ref = _value_and_grads(impl="xla")(x, w, group_sizes, dy)
  loop = _numpy_gmm(x, w, gs, dy.astype(dtype))
  for name, g, r, n in zip(("y", "dx", "dw"), got, ref, loop):
    assert g.dtype == r.dtype, f"{name}: {g.dtype} != {r.dtype}"
    assert_close(g, r, TOL[dtype], f"{name} vs ragged_dot")
    assert_close(g, n, TOL[dtype], f"{name} vs numpy")
  y, dx = np.asarray(got[0]), np.asarray(got[1])
  assert not y[sum(gs):].any() and not dx[sum(gs):].any(), "rows past the groups must be 0"


def test_bf16_inputs_f32_output():
  """preferred_element_type=f32 on bf16 inputs: f32 output, bf16 gradients."""
  gs = (30, 0, 21, 13)
  x, w, dy = _inputs(80, 48, 40, len(gs), jnp.bfloat16, seed=1)
  group_sizes = jnp.array(gs, jnp.int32)
  kw = dict(preferred_element_type=jnp.float32)
  got = _value_and_grads(impl="triton", interpret=True, block_sizes=SMALL, **kw)(
      x, w, group_sizes, dy)
  assert [a.dtype for a in got] == [jnp.float32, jnp.bfloat16, jnp.bfloat16]
  loop = _numpy_gmm(x, w, gs, dy)
  assert_close(got[0], loop[0], 1e-5, "y")  # bf16 products are exact in f32
  for name, g, n in zip(("dx", "dw"), got[1:], loop[1:]):
    assert_close(g, n, TOL[jnp.bfloat16], name)


@pytest.mark.parametrize("a,bm", [(100, 16), (64, 64), (1000, 64)])
def test_work_items_cover_each_row_once(a, bm):
  """Every row in [0, A) is stored by exactly one used item, of the right group (the pseudo
  group E past the groups), and the static item count suffices, for random group sizes with
  empty groups and fewer rows than A."""
  rng = np.random.default_rng(a)
  work_items = jax.jit(lambda gs, a, bm: _work_items(_group_bounds(gs, a), a, bm),
                       static_argnums=(1, 2))
  for e in (1, 3, 8, 40):
    total = rng.integers(0, a + 1)
    sizes = np.diff(np.sort(np.concatenate([[0, total], rng.integers(0, total + 1, e - 1)])))
    items = np.asarray(work_items(jnp.asarray(sizes, jnp.int32), a, bm))
    group_of_row = np.repeat(np.arange(e + 1), np.append(sizes, a - sizes.sum()))
    covered = np.zeros(a, int)
    for g, tile, lo, hi in items.T:
      assert tile * bm <= lo <= hi <= min(tile * bm + bm, a)
      covered[lo:hi] += 1
      assert (group_of_row[lo:hi] == g).all()
    np.testing.assert_array_equal(covered, 1)


def test_errors_are_for_people():
  x, w = jnp.zeros((8, 16)), jnp.zeros((2, 16, 4))
  with pytest.raises(ValueError, match="impl must be one of"):
    grouped_matmul(x, w, jnp.array([4, 4]), impl="pallas")
  with pytest.raises(ValueError, match=r"x \[A, D=16\]"):
    grouped_matmul(jnp.zeros((8, 12)), w, jnp.array([4, 4]))
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_m=48)


def test_auto_on_cpu_is_ragged_dot():
  """Lowered for CPU, auto is the XLA path (jax lowers ragged_dot there to a masked dot): no
  Triton kernel, no interpreter loops."""
  args = (jax.ShapeDtypeStruct((64, 32), jnp.float32),
          jax.ShapeDtypeStruct((4, 32, 16), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.int32))
  text = jax.jit(grouped_matmul).lower(*args).as_text()
  assert "dot_general" in text and "triton" not in text and "while" not in text


def test_grouped_matmul_path_says_why():
  path = lambda platform, dtype=jnp.bfloat16, **kw: str(paths.grouped_matmul_path(
      platform, x_dtype=dtype, w_dtype=dtype, **kw))
  assert path("gpu") == path("cuda") == "triton (Triton gmm)"
  assert path("cuda", jnp.float16) == "xla (dtype float16 not covered by the Triton gmm kernel)"
  assert path("tpu") == "megablox (Mosaic megablox gmm)"
  assert path("cpu") == "xla (no grouped-matmul kernel for cpu)"
  assert path("cpu", impl="triton") == "triton (Triton gmm)"
  assert path("cuda", impl="xla") == "xla (impl='xla')"
