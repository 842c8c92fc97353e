"""Grouped matmul (the MoE experts' matmul) as Pallas Triton kernels, with their backward.

  y_AF = grouped_matmul(x_AD, w_EDF, group_sizes_E)

Rows are sorted by group: row block g (group_sizes[g] consecutive rows) multiplies w[g]; rows
past sum(group_sizes) give 0. This is `jax.lax.ragged_dot`, which is the reference
(`grouped_matmul_reference`, impl="xla"). XLA:GPU lowers ragged_dot to a dense
[A, E*D] x [E*D, F] matmul, E times the FLOPs and the memory of the grouped one; these kernels
do the grouped work only.

gmm (forward, and dx = dy w^T): the plain-JAX prologue `_work_items` lists, for each group, the
row tiles of block_m rows it touches, plus one pseudo group for the rows past the groups (whose
items store zeros, so every output row is written exactly once and no zeroed buffer is aliased
in). A group's rows straddle tile edges, so a tile shared by k groups is k items, each loading
and storing only its own rows (masks): items never write the same row, and the sum over items
is at most ceil(A / block_m) + E, the static grid length (unused items do nothing). One program
per (item, block of output columns) loops over the contraction in block_k chunks and
accumulates in f32. dx reads w[g] blocks as [n, k] and contracts their second axes (Triton's
dot takes the transposed operand), so w^T is never written to memory.

tgmm (dw[g] = x[rows of g]^T dy[rows of g]): one program per (group, D block, F block) loops
over the row tiles of its group (a dynamic trip count; a group without rows stores 0).

Cost: an item computes a whole block_m tile however few of its rows are the group's, so the
work is (ceil(A / block_m) + E) * block_m rows instead of A: 1.5x at A = 8192, E = 64,
block_m = 64 (128 rows a group); block_m = 128 would make that 2x. The same holds for megablox.
D and F need not divide the blocks: loads past the edge are masked to 0, stores masked off.

Other platforms: impl="auto" runs the kernels where `paths.grouped_matmul_path` says they are
compile-tested: these on CUDA, JAX's megablox kernels on TPU (pallas_kernels/_gmm_tpu.py), and
ragged_dot elsewhere.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _gmm_tpu
from pallas_kernels.paths import GMM_IMPLS, grouped_matmul_path

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T, b read as stored
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two >= 16). They change speed, never results.

  gmm (forward and dx): block_m rows a work item, block_k of the contraction a loop step,
  block_n output columns a program. tgmm (dw): block_m_dw rows a loop step, and a
  block_d_dw x block_f_dw tile of dw[g] a program. Blocks larger than their (padded-to-pow2)
  dimension are shrunk to it. The defaults fit the shared memory of an A100 (the smallest GPU
  tests/test_target_compile_kernels.py compiles for) in bf16 and f32.
  """
  block_m: int = 64
  block_k: int = 64
  block_n: int = 128
  block_m_dw: int = 64
  block_d_dw: int = 128
  block_f_dw: int = 128

  def __post_init__(self):
    for f in dataclasses.fields(self):
      n = getattr(self, f.name)
      if not isinstance(n, int) or n < MIN_BLOCK or n & (n - 1):
        raise ValueError(f"BlockSizes.{f.name} must be a power of two >= {MIN_BLOCK}, got {n!r}")


def _fit(block, n):
  return min(block, pl.next_power_of_2(max(n, MIN_BLOCK)))


def _compiler_params(rows, cols, itemsize):
  # 8 warps for 128 x 128 f32 accumulators (64 registers a thread at 4 warps is the limit we
  # allow); 3 pipeline stages for 2-byte inputs, 2 for f32 (A100 shared memory: 163 KiB).
  return plgpu.CompilerParams(num_warps=4 if rows * cols <= 64 * 128 else 8,
                              num_stages=3 if itemsize <= 2 else 2)


def _precision(dtype):
  # f32 inputs get IEEE f32 matmuls (Triton would otherwise be free to use TF32).
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


# ---------------------------------------------------------------------------------- reference


def grouped_matmul_reference(x_AD, w_EDF, group_sizes_E, *, preferred_element_type=None):
  """jax.lax.ragged_dot: the semantics (and impl="xla"). Differentiable by JAX itself."""
  return lax.ragged_dot(x_AD, w_EDF, group_sizes_E, preferred_element_type=preferred_element_type)


# ------------------------------------------------------------------------------------ kernels


def _group_bounds(group_sizes_E, a):
  """int32 [2, E]: the rows [start, end) of each group, clipped to the A rows there are."""
  ends = jnp.minimum(jnp.cumsum(group_sizes_E.astype(jnp.int32)), a)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return jnp.stack([starts, ends])


def _work_items(bounds_2E, a, bm):
  """int32 [4, N]: (group, tile, lo, hi) per work item, N = ceil(A / bm) + E.

  Item i stores the rows [lo, hi) of row tile `tile` (rows tile * bm ...), which belong to group
  `group`; group E is the pseudo group of the rows past the groups (stored as zeros). Groups
  touch consecutive tiles, and only a tile that holds a boundary between groups is touched by
  more than one, so the E + 1 groups need at most ceil(A / bm) + E items. Unused items have
  group E and lo = hi (they do nothing).
  """
  e = bounds_2E.shape[1]
  n = pl.cdiv(a, bm) + e
  starts = jnp.append(bounds_2E[0], bounds_2E[1, -1])  # [E + 1] with the pseudo group
  ends = jnp.append(bounds_2E[1], a)
  first, last = starts // bm, (ends - 1) // bm
  count = jnp.where(ends > starts, last - first + 1, 0)
  offset = jnp.cumsum(count)
  i = jnp.arange(n, dtype=jnp.int32)
  g = jnp.minimum(jnp.searchsorted(offset, i, side="right"), e).astype(jnp.int32)
  used = i < offset[-1]
  tile = first[g] + i - (offset[g] - count[g])
  lo = jnp.maximum(starts[g], tile * bm)
  hi = jnp.minimum(ends[g], tile * bm + bm)
  zero = jnp.zeros_like(i)
  return jnp.stack([jnp.where(used, g, e), jnp.where(used, tile, zero),
                    jnp.where(used, lo, zero), jnp.where(used, hi, zero)])


def _gmm_kernel(items_ref, x_ref, w_ref, out_ref, *, groups, k_dim, n_dim, bm, bk, bn,
                transpose_w, precision):
  """One work item (a row tile of one group) times one block of output columns.

  x [A, K]; w [E, K, N], or [E, N, K] read transposed (transpose_w, the dx pass); out [A, N].
  """
  i, j = pl.program_id(0), pl.program_id(1)
  g, tile, lo, hi = items_ref[0, i], items_ref[1, i], items_ref[2, i], items_ref[3, i]
  row0 = pl.multiple_of(tile * bm, bm)
  rows = row0 + lax.iota(jnp.int32, bm)
  rows_ok = ((rows >= lo) & (rows < hi))[:, None]
  cols = j * bn + lax.iota(jnp.int32, bn)
  cols_ok = cols < n_dim
  dtype = jnp.promote_types(x_ref.dtype, w_ref.dtype)

  def body(kb, acc_MN):
    k0 = pl.multiple_of(kb * bk, bk)
    ks_ok = k0 + lax.iota(jnp.int32, bk) < k_dim
    x_MK = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=rows_ok & ks_ok[None, :],
                      other=0)
    if transpose_w:
      w = plgpu.load(w_ref.at[g, pl.ds(j * bn, bn), pl.ds(k0, bk)],
                     mask=cols_ok[:, None] & ks_ok[None, :], other=0)  # [N, K]
    else:
      w = plgpu.load(w_ref.at[g, pl.ds(k0, bk), pl.ds(j * bn, bn)],
                     mask=ks_ok[:, None] & cols_ok[None, :], other=0)  # [K, N]
    return acc_MN + lax.dot_general(x_MK.astype(dtype), w.astype(dtype),
                                    _NT if transpose_w else _NN, precision=precision,
                                    preferred_element_type=jnp.float32)

  # The pseudo group (rows past the groups) and unused items skip the loop: their acc is 0.
  # (Typed bounds: with a Python int here Triton's scf.for got bounds of different types.)
  steps = jnp.where((g < groups) & (hi > lo), jnp.int32(pl.cdiv(k_dim, bk)), jnp.int32(0))
  acc_MN = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
  plgpu.store(out_ref.at[pl.ds(row0, bm), pl.ds(j * bn, bn)], acc_MN.astype(out_ref.dtype),
              mask=rows_ok & cols_ok[None, :])


def _gmm(x_AK, w, bounds_2E, *, transpose_w, out_dtype, blocks, interpret):
  """[A, K] x [E, K, N] (or [E, N, K] with transpose_w) -> [A, N] in out_dtype."""
  a, k = x_AK.shape
  groups, n = w.shape[0], w.shape[1 if transpose_w else 2]
  bm, bk, bn = _fit(blocks.block_m, a), _fit(blocks.block_k, k), _fit(blocks.block_n, n)
  items_4N = _work_items(bounds_2E, a, bm)
  kernel = functools.partial(_gmm_kernel, groups=groups, k_dim=k, n_dim=n, bm=bm, bk=bk, bn=bn,
                             transpose_w=transpose_w,
                             precision=_precision(jnp.promote_types(x_AK.dtype, w.dtype)))
  itemsize = max(x_AK.dtype.itemsize, w.dtype.itemsize)
  return pl.pallas_call(
      kernel,
      grid=(items_4N.shape[1], pl.cdiv(n, bn)),
      out_shape=jax.ShapeDtypeStruct((a, n), out_dtype),
      compiler_params=_compiler_params(bm, bn, itemsize),
      interpret=interpret,
      name="grouped_matmul_dx" if transpose_w else "grouped_matmul",
  )(items_4N, x_AK, w)


def _tgmm_kernel(bounds_ref, x_ref, dy_ref, dw_ref, *, d_dim, f_dim, bm, bd, bf, precision):
  """dw[g][D block, F block] = sum over g's row tiles of x_tile^T dy_tile."""
  g, jd, jf = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = bounds_ref[0, g], bounds_ref[1, g]
  ds_ok = (jd * bd + lax.iota(jnp.int32, bd) < d_dim)[None, :]
  fs_ok = (jf * bf + lax.iota(jnp.int32, bf) < f_dim)[None, :]
  dtype = jnp.promote_types(x_ref.dtype, dy_ref.dtype)

  def body(t, acc_DF):
    row0 = pl.multiple_of(t * bm, bm)
    rows = row0 + lax.iota(jnp.int32, bm)
    rows_ok = ((rows >= start) & (rows < end))[:, None]
    x_MD = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(jd * bd, bd)], mask=rows_ok & ds_ok,
                      other=0)
    dy_MF = plgpu.load(dy_ref.at[pl.ds(row0, bm), pl.ds(jf * bf, bf)], mask=rows_ok & fs_ok,
                       other=0)
    return acc_DF + lax.dot_general(x_MD.astype(dtype), dy_MF.astype(dtype), _TN,
                                    precision=precision, preferred_element_type=jnp.float32)

  first = start // bm
  stop = jnp.where(end > start, pl.cdiv(end, bm), first)  # a group without rows: no steps
  acc_DF = lax.fori_loop(first, stop, body, jnp.zeros((bd, bf), jnp.float32))
  plgpu.store(dw_ref.at[g, pl.ds(jd * bd, bd), pl.ds(jf * bf, bf)], acc_DF.astype(dw_ref.dtype),
              mask=ds_ok.T & fs_ok)


def _tgmm(x_AD, dy_AF, bounds_2E, *, out_dtype, blocks, interpret):
  """dw [E, D, F] in out_dtype: each group's x rows transposed times its dy rows."""
  (a, d), f, e = x_AD.shape, dy_AF.shape[1], bounds_2E.shape[1]
  bm, bd, bf = (_fit(blocks.block_m_dw, a), _fit(blocks.block_d_dw, d),
                _fit(blocks.block_f_dw, f))
  kernel = functools.partial(_tgmm_kernel, d_dim=d, f_dim=f, bm=bm, bd=bd, bf=bf,
                             precision=_precision(jnp.promote_types(x_AD.dtype, dy_AF.dtype)))
  itemsize = max(x_AD.dtype.itemsize, dy_AF.dtype.itemsize)
  return pl.pallas_call(
      kernel,
      grid=(e, pl.cdiv(d, bd), pl.cdiv(f, bf)),
      out_shape=jax.ShapeDtypeStruct((e, d, f), out_dtype),
      compiler_params=_compiler_params(bd, bf, itemsize),
      interpret=interpret,
      name="grouped_matmul_dw",
  )(bounds_2E, x_AD, dy_AF)


@dataclasses.dataclass(frozen=True)
class _Static:
  out_dtype: jnp.dtype
  blocks: BlockSizes
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _triton(x_AD, w_EDF, group_sizes_E, cfg):
  bounds_2E = _group_bounds(group_sizes_E, x_AD.shape[0])
  return _gmm(x_AD, w_EDF, bounds_2E, transpose_w=False, out_dtype=cfg.out_dtype,
              blocks=cfg.blocks, interpret=cfg.interpret)


def _triton_fwd(x_AD, w_EDF, group_sizes_E, cfg):
  return _triton(x_AD, w_EDF, group_sizes_E, cfg), (x_AD, w_EDF, group_sizes_E)


def _triton_bwd(cfg, res, dy_AF):
  x_AD, w_EDF, group_sizes_E = res
  bounds_2E = _group_bounds(group_sizes_E, x_AD.shape[0])
  dx_AD = _gmm(dy_AF, w_EDF, bounds_2E, transpose_w=True, out_dtype=x_AD.dtype,
               blocks=cfg.blocks, interpret=cfg.interpret)
  dw_EDF = _tgmm(x_AD, dy_AF, bounds_2E, out_dtype=w_EDF.dtype, blocks=cfg.blocks,
                 interpret=cfg.interpret)
  return dx_AD, dw_EDF, None


_triton.defvjp(_triton_fwd, _triton_bwd)


# ---------------------------------------------------------------------------------- public


def _xla_impl(x_AD, w_EDF, group_sizes_E, *, out_dtype, blocks, interpret):
  del blocks, interpret
  return grouped_matmul_reference(x_AD, w_EDF, group_sizes_E, preferred_element_type=out_dtype)


def _triton_impl(x_AD, w_EDF, group_sizes_E, *, out_dtype, blocks, interpret):
  return _triton(x_AD, w_EDF, group_sizes_E, _Static(out_dtype, blocks, interpret))


def _megablox_impl(x_AD, w_EDF, group_sizes_E, *, out_dtype, blocks, interpret):
  del blocks  # megablox's tiles: _gmm_tpu.tiling
  return _gmm_tpu.grouped_matmul(x_AD, w_EDF, group_sizes_E, out_dtype, interpret)


# impl -> differentiable fn(x, w, group_sizes, *, out_dtype, blocks, interpret); impl="auto"
# finds a platform's through paths.GMM_KERNELS.
_IMPLS = {"xla": _xla_impl, "triton": _triton_impl, "megablox": _megablox_impl}


@functools.partial(jax.jit, static_argnames=("impl", "block_sizes", "interpret",
                                             "preferred_element_type"))
def grouped_matmul(x_AD, w_EDF, group_sizes_E, *, impl="auto", block_sizes=None, interpret=False,
                   preferred_element_type=None):
  """x [A, D], w [E, D, F], group_sizes int32 [E] -> [A, F]; `jax.lax.ragged_dot`'s semantics.

  Differentiable in x and w (not group_sizes). Output dtype: preferred_element_type, else the
  promoted dtype of x and w; accumulation is f32 in the kernels.
  impl: "auto" (the platform's kernel where `paths.grouped_matmul_path` says it is
    compile-tested, decided for the platform the program is lowered for; ragged_dot
    elsewhere), "xla" (ragged_dot), "triton" (ours, GPU) or "megablox" (JAX's, TPU).
  block_sizes: a `BlockSizes` of the Triton kernels; None takes the defaults.
  interpret (impl="triton" or "megablox"): run the kernels in the Pallas interpreter (tests,
    on CPU).
  """
  if impl not in GMM_IMPLS:
    raise ValueError(f"impl must be one of {GMM_IMPLS}, got {impl!r}")
  if x_AD.ndim != 2 or w_EDF.ndim != 3 or group_sizes_E.ndim != 1:
    raise ValueError(f"grouped_matmul expects x [A, D], w [E, D, F], group_sizes [E]; got "
                     f"x {x_AD.shape}, w {w_EDF.shape}, group_sizes {group_sizes_E.shape}")
  if x_AD.shape[1] != w_EDF.shape[1] or group_sizes_E.shape[0] != w_EDF.shape[0]:
    raise ValueError(f"x [A, D={w_EDF.shape[1]}] and group_sizes [E={w_EDF.shape[0]}] must "
                     f"match w [E, D, F] = {w_EDF.shape}; got x {x_AD.shape}, group_sizes "
                     f"{group_sizes_E.shape}")
  if not jnp.issubdtype(group_sizes_E.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be integers, got {group_sizes_E.dtype}")
  out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(x_AD.dtype, w_EDF.dtype))
  kwargs = dict(out_dtype=out_dtype, blocks=block_sizes or BlockSizes(), interpret=interpret)
  args = (x_AD, w_EDF, group_sizes_E.astype(jnp.int32))
  if impl != "auto":
    return _IMPLS[impl](*args, **kwargs)
  # lax.platform_dependent keeps the branch of the platform being lowered (so a CPU process
  # compiling for GPU devices gets the kernels); interpret applies to a named impl only.
  kwargs["interpret"] = False
  branch = lambda p: functools.partial(
      _IMPLS[grouped_matmul_path(p, x_dtype=x_AD.dtype, w_dtype=w_EDF.dtype).impl], **kwargs)
  return lax.platform_dependent(*args, default=branch("cpu"),
                                **{p: branch(p) for p in ("cuda", "rocm", "tpu")})
