"""The weight-only quantized matmul: its conventions on numbers worked out by hand, the jnp
reference against a numpy dequantize written here from the conventions (bit ops on the bytes),
and both kernels (Mosaic's TPU variant and Triton's GPU variant, in Pallas interpret mode on
CPU) against the reference, forward and dx.

Kernel cases cover every kind (int8, int4 symmetric and asymmetric, nf4) with every group size
(32, 64, 128, per channel), M in {1, 7, 64}, bf16 and f32, K tiles that hold several groups and
groups that span several K tiles, and M and N that no tile divides (N = 320: TPU partial edge
blocks, GPU masks). tests/test_target_compile_kernels.py compiles the kernels with Mosaic for
v5e and v6e and with Triton for H100 and A100.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from closeness import assert_close
from pallas_kernels import paths
from pallas_kernels.quantized_matmul import (BlockSizes, dequantize, quantized_matmul,
                                             quantized_matmul_reference, unpack_int4)

pytestmark = pytest.mark.usefixtures("quick_compiles")

# QLoRA (Dettmers et al. 2023), Appendix E, typed in again here: the test's own code book.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176636,
                0.7229568362236328, 1.0])
# Relative tolerances: error / max(1, max|want|). bf16: the kernels may round W (or scale the
# product instead of W) differently from the reference's bf16 W.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
KINDS = [("int8", False), ("int4", False), ("int4", True), ("nf4", False)]


def _numpy_dequantize(values, scales, zeros, kind, group):
  """W [K, N] in f64, straight from the conventions."""
  v = np.asarray(values)
  if kind == "int8":
    q = v.astype(np.float64)
  else:
    lo, hi = v & 0x0F, v >> 4
    nib = np.empty((2 * v.shape[0], v.shape[1]), np.int64)
    nib[0::2], nib[1::2] = lo, hi  # byte i: row 2i low nibble, row 2i + 1 high
    if kind == "nf4":
      q = NF4[nib]
    elif zeros is None:
      q = np.where(nib >= 8, nib - 16, nib).astype(np.float64)
    else:
      q = nib.astype(np.float64)
  rows = np.arange(q.shape[0]) // group
  if zeros is not None:
    q = q - np.asarray(zeros, np.float64)[rows]
  return q * np.asarray(scales, np.float64)[rows]


def _quantized(kind, asym, k, n, group, seed=0, scale_dtype=jnp.float32):
  """Random codes over their whole range, scales ~ 1 / sqrt(K), zeros in [0, 15]."""
  rng = np.random.default_rng(seed)
  g = k // group
  if kind == "int8":
    values = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    s = 1 / (64 * np.sqrt(k))
  else:
    values = jnp.asarray(rng.integers(0, 256, (k // 2, n)), jnp.uint8)
    s = 1 / np.sqrt(k) / (1 if kind == "nf4" else 4)
  scales = jnp.asarray(rng.uniform(0.5, 1.5, (g, n)) * s, scale_dtype)
  zeros = jnp.asarray(rng.uniform(0, 15, (g, n)), scale_dtype) if asym else None
  return values, scales, zeros


# --------------------------------------------------------------------------- conventions


def test_conventions_by_hand():
  """x = [1, 10] times one packed byte 0x9F (row 0: low nibble 0xF, row 1: high nibble 0x9),
  scale 2: int4 symmetric (-1, -7), asymmetric with zero 8 (15 - 8, 9 - 8), nf4 (1.0,
  0.16093...); and int8 rows (3, -4)."""
  x = jnp.array([[1.0, 10.0]])
  byte = jnp.array([[0x9F]], jnp.uint8)
  s = jnp.array([[2.0]])
  np.testing.assert_array_equal(unpack_int4(byte, signed=True), [[-1], [-7]])
  np.testing.assert_array_equal(unpack_int4(byte, signed=False), [[15], [9]])
  ref = lambda v, kind, z=None: float(quantized_matmul_reference(x, v, s, z, kind=kind,
                                                                 group=2)[0, 0])
  assert ref(byte, "int4") == (1 * -1 + 10 * -7) * 2
  assert ref(byte, "int4", jnp.array([[8.0]])) == (1 * 7 + 10 * 1) * 2
  np.testing.assert_allclose(ref(byte, "nf4"), (1.0 + 10 * 0.16093020141124725) * 2, rtol=1e-6)
  assert ref(jnp.array([[3], [-4]], jnp.int8), "int8") == (3 - 40) * 2


@pytest.mark.parametrize("kind,asym", KINDS, ids=lambda v: str(v))
def test_reference_matches_numpy(kind, asym):
  """dequantize and the reference's matmul against numpy, every group size (M rotating
  through 1, 7 and 64)."""
  k, n = 256, 384
  rng = np.random.default_rng(1)
  ref = jax.jit(quantized_matmul_reference, static_argnames=("kind", "group"))
  for group, m in zip((32, 64, 128, k), (1, 7, 64, 7)):
    values, scales, zeros = _quantized(kind, asym, k, n, group, seed=group)
    w = _numpy_dequantize(values, scales, zeros, kind, group)
    assert_close(dequantize(values, scales, zeros, kind, group, jnp.float32), w, 1e-6,
                  f"dequantize g{group}")
    x = rng.standard_normal((m, k)).astype(np.float32)
    assert_close(ref(jnp.asarray(x), values, scales, zeros, kind=kind, group=group),
                  x @ w, TOL[jnp.float32], f"reference g{group} M{m}")


# ------------------------------------------------------------------------------- kernels

# (kind, asym, group (None: per channel), M, K, dtype, blocks): each kind meets every group
# size; M and the dtype rotate. Default blocks take the whole K = 256 (2..8 groups a TPU tile,
# scaled before the dot); block_k = group (int8 g128), or K = 512 per channel with block_k 256,
# give TPU tiles in one group (scaled after the dot), and g256 over K = 1024 walks such tiles
# through four groups of scales and zeros. GPU tiles lie in one group; the default split of K
# over programs (decode) makes partial sums.
T256 = BlockSizes(block_k=256)
CASES = [
    ("int8", False, 32, 1, 256, jnp.bfloat16, None),
    ("int8", False, 64, 7, 256, jnp.float32, None),
    ("int8", False, 128, 64, 512, jnp.bfloat16, BlockSizes(block_k=128)),
    ("int8", False, None, 7, 512, jnp.float32, T256),
    ("int4", False, 32, 7, 256, jnp.float32, None),
    ("int4", False, 64, 64, 256, jnp.bfloat16, None),
    ("int4", False, 128, 1, 256, jnp.float32, None),
    ("int4", False, None, 64, 512, jnp.bfloat16, T256),
    ("int4", True, 32, 64, 256, jnp.bfloat16, None),
    ("int4", True, 64, 1, 256, jnp.float32, None),
    ("int4", True, 128, 7, 256, jnp.bfloat16, None),
    ("int4", True, None, 1, 512, jnp.float32, T256),
    ("int4", True, 256, 7, 1024, jnp.bfloat16, T256),
    ("nf4", False, 32, 1, 256, jnp.float32, None),
    ("nf4", False, 64, 7, 256, jnp.bfloat16, None),
    ("nf4", False, 128, 64, 256, jnp.float32, None),
    ("nf4", False, None, 7, 512, jnp.bfloat16, T256),
]
N = 384


def _case_id(c):
  kind, asym, group, m, k, dtype, blocks = c
  return (f"{kind}{'-asym' if asym else ''}-g{group or 'K'}-M{m}-K{k}-{jnp.dtype(dtype).name}"
          f"{f'-bk{blocks.block_k}' if blocks else ''}")


def _inputs(case, n=N, seed=0):
  kind, asym, group, m, k, dtype, _ = case
  group = group or k
  values, scales, zeros = _quantized(kind, asym, k, n, group, seed=seed,
                                     scale_dtype=jnp.bfloat16 if dtype == jnp.bfloat16
                                     else jnp.float32)
  x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((m, k)), dtype)
  return x, values, scales, zeros


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case, backend):
  kind, asym, group, m, k, dtype, blocks = case
  x, values, scales, zeros = _inputs(case)
  kw = dict(kind=kind, group=group or k)
  got = quantized_matmul(x, values, scales, zeros, impl="pallas", interpret=True,
                         backend=backend, block_sizes=blocks, **kw)
  want = quantized_matmul(x, values, scales, zeros, impl="xla", **kw)
  assert got.dtype == want.dtype == dtype
  assert_close(got, want, TOL[dtype], f"{backend} kernel vs reference")


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_edges_no_tile_divides(backend):
  """M = 50 and N = 320 in tiles of 16 x 128 (TPU: partial edge blocks, in TPU interpret mode
  that simulates the DMAs) or 16 x 64 (GPU: masks), f32 output from bf16 x, K split over 3
  GPU programs; leading dims of x are kept."""
  case = ("int4", True, 64, 50, 512, jnp.bfloat16, None)
  x, values, scales, zeros = _inputs(case, n=320, seed=3)
  blocks = BlockSizes(16, 128, 256) if backend == "tpu" else BlockSizes(16, 64, 64, 3)
  interpret = pltpu.InterpretParams(random_seed=0) if backend == "tpu" else True
  got = quantized_matmul(x.reshape(5, 10, 512), values, scales, zeros, kind="int4", group=64,
                         impl="pallas", interpret=interpret, backend=backend, block_sizes=blocks,
                         out_dtype=jnp.float32)
  assert got.shape == (5, 10, 320) and got.dtype == jnp.float32
  want = np.asarray(x, np.float64) @ _numpy_dequantize(values, scales, zeros, "int4", 64)
  assert_close(got.reshape(50, 320), want, TOL[jnp.bfloat16], f"{backend} vs numpy")


@pytest.mark.parametrize("impl,backend", [("xla", None), ("pallas", "tpu"), ("pallas", "gpu")])
def test_dx_matches_numpy(impl, backend):
  """dx = dy W^T through the kernel's custom_vjp (and XLA's), against numpy; the frozen
  weights' scales and zeros get zero cotangents."""
  k, n, m, group = 256, N, 7, 64
  values, scales, zeros = _quantized("int4", True, k, n, group, seed=5)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  dy = rng.standard_normal((m, n))

  def loss(x, scales, zeros):
    y = quantized_matmul(x, values, scales, zeros, kind="int4", group=group, impl=impl,
                         interpret=impl == "pallas", backend=backend)
    return jnp.sum(y * dy)

  dx, ds, dz = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scales, zeros)
  w = _numpy_dequantize(values, scales, zeros, "int4", group)
  assert_close(dx, dy @ w.T, TOL[jnp.float32], "dx")
  assert not np.any(ds) and not np.any(dz)


# --------------------------------------------------------------------- paths and errors


def test_auto_on_cpu_is_xla():
  """Lowered for CPU, auto is the reference: no kernel, no interpreter loops."""
  args = (jax.ShapeDtypeStruct((8, 256), jnp.bfloat16),
          jax.ShapeDtypeStruct((128, 384), jnp.uint8), jax.ShapeDtypeStruct((2, 384), jnp.bfloat16))
  text = jax.jit(lambda x, v, s: quantized_matmul(x, v, s, kind="nf4", group=128)).lower(
      *args).as_text()
  assert "dot_general" in text and "while" not in text and "custom_call" not in text


def test_quantized_matmul_path_says_why():
  path = lambda platform, dtype=jnp.bfloat16, kind="int4", k=4096, group=128, **kw: str(
      paths.quantized_matmul_path(platform, x_dtype=dtype, kind=kind, k=k, group=group, **kw))
  assert path("tpu") == "pallas (Mosaic qmm)"
  assert path("gpu", group=4096) == path("cuda", group=4096) == "pallas (Triton qmm)"
  assert path("cpu") == "xla (no quantized-matmul kernel for cpu)"
  assert path("cpu", impl="pallas") == "pallas (Mosaic qmm, interpreted)"
  assert path("tpu", jnp.float16) == "xla (dtype float16 not covered by the Mosaic qmm kernel)"
  assert path("cuda", group=256) == "xla (group 256 not covered by the Triton qmm kernel)"
  assert path("cuda", group=256, impl="pallas") == "pallas (Triton qmm)"
  assert path("cuda", group=48, k=4800).startswith("xla (group 48 with K=4800 fits no GPU kernel")
  assert path("tpu", group=8, k=4096).startswith("xla (group 8 with K=4096 fits no TPU kernel")
  assert path("tpu", impl="xla") == "xla (impl='xla')"
  # The tile rules: TPU lane-aligned K tiles of whole 8-row pieces, GPU powers of two.
  assert paths.qmm_block_k("tpu", "int4", 4096, 128, 1024) == 1024
  assert paths.qmm_block_k("tpu", "int8", 11008, 11008, 1024) == 256
  assert paths.qmm_block_k("gpu", "int8", 4096, 4096, 256) == 256
  assert paths.qmm_block_k("gpu", "nf4", 4096, 64, 256) == 64


def test_errors_are_for_people():
  x = jnp.zeros((4, 256), jnp.bfloat16)
  v8, v4 = jnp.zeros((256, 128), jnp.int8), jnp.zeros((128, 128), jnp.uint8)
  s = jnp.zeros((2, 128))
  with pytest.raises(ValueError, match="kind must be one of"):
    quantized_matmul(x, v8, s, kind="int3", group=128)
  with pytest.raises(ValueError, match="stores values as uint8"):
    quantized_matmul(x, v8, s, kind="int4", group=128)
  with pytest.raises(ValueError, match=r"needs values \[K/2=128, N\]"):
    quantized_matmul(x, jnp.zeros((256, 128), jnp.uint8), s, kind="nf4", group=128)
  with pytest.raises(ValueError, match=r"scales must be \[G=K/group=4, N=128\]"):
    quantized_matmul(x, v4, s, kind="int4", group=64)
  with pytest.raises(ValueError, match="group must divide K=256"):
    quantized_matmul(x, v4, s, kind="int4", group=100)
  with pytest.raises(ValueError, match="asymmetric int4 only"):
    quantized_matmul(x, v8, s, s, kind="int8", group=128)
  with pytest.raises(ValueError, match="block_n a multiple of 128"):
    quantized_matmul(x, v8, s, kind="int8", group=128, impl="pallas", interpret=True,
                     backend="tpu", block_sizes=BlockSizes(block_n=96))
  with pytest.raises(ValueError, match="powers of two"):
    quantized_matmul(x, v8, s, kind="int8", group=128, impl="pallas", interpret=True,
                     backend="gpu", block_sizes=BlockSizes(block_m=24))
  with pytest.raises(ValueError, match="fits no GPU kernel tile"):
    quantized_matmul(x, v8, jnp.zeros((32, 128)), kind="int8", group=8, impl="pallas",
                     interpret=True, backend="gpu")
