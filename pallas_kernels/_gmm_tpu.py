"""Grouped matmul on TPU: JAX's Pallas megablox kernels (Mosaic), made to take any row count.

megablox's `gmm` (rows of group g times w[g]) and `tgmm` (per group, x_g^T @ dy_g) are the
kernels MaxText's MoE runs on TPU. Why not XLA:TPU's own ragged_dot: its forward is a kernel
too, but its backward computes the weight gradient densely, E times the FLOPs (the TPU
compiler's cost analysis, tests/test_target_compile_kernels.py). What this wrapper adds:
  rows      megablox needs a row count divisible by its row tile; the rows are zero-padded
            to one, and the padding belongs to no group;
  unvisited megablox leaves rows past sum(group_sizes) unwritten (uninitialised memory); it
            writes into zeros here, so they are 0, as ragged_dot's are, forward and backward;
  tiles     (tm, tk, tn) = (512, 1024, 1024) at most (MaxText's defaults), smaller for small
            problems: a decode step's few rows take a row tile of 16, not 512.
"""

import functools
import importlib

import jax
import jax.numpy as jnp

# The module, not the package's differentiable `gmm`: the backward pass below is ours.
_megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

MAX_TILES = (512, 1024, 1024)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  """(tm, tk, tn) for [m, k] @ [k, n] groups: a whole dimension where it fits one tile (any
  size is a legal block then), else the largest tile, its last block masked by megablox."""
  tm = min(MAX_TILES[0], _round_up(m, 16))
  tk = k if k <= MAX_TILES[1] else MAX_TILES[1]
  tn = n if n <= MAX_TILES[2] else MAX_TILES[2]
  return tm, tk, tn


def _pad_rows(x_AX, tm: int):
  pad = _round_up(x_AX.shape[0], tm) - x_AX.shape[0]
  return jnp.pad(x_AX, ((0, pad), (0, 0))) if pad else x_AX


def _gmm(x_AD, w_EDF, group_sizes_E, out_dtype, interpret, transpose_rhs=False):
  a, d = x_AD.shape
  f = w_EDF.shape[1] if transpose_rhs else w_EDF.shape[2]
  tiles = tiling(a, d, f)
  x_PD = _pad_rows(x_AD, tiles[0])
  # Written into zeros (aliased, so no second buffer): the rows megablox does not visit, past
  # the groups, stay 0.
  y_PF = _megablox.gmm(x_PD, w_EDF, group_sizes_E, preferred_element_type=out_dtype,
                       tiling=tiles, existing_out=jnp.zeros((x_PD.shape[0], f), out_dtype),
                       transpose_rhs=transpose_rhs, interpret=interpret)
  return y_PF[:a]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul(x_AD, w_EDF, group_sizes_E, out_dtype, interpret=False):
  """y [A, F] in out_dtype: row block g of x_AD (group_sizes_E[g] rows, in order) times
  w_EDF[g]; rows past the groups are 0. Differentiable in x and w, like `jax.lax.ragged_dot`."""
  return _gmm(x_AD, w_EDF, group_sizes_E, out_dtype, interpret)


def _forward(x_AD, w_EDF, group_sizes_E, out_dtype, interpret):
  y_AF = _gmm(x_AD, w_EDF, group_sizes_E, out_dtype, interpret)
  return y_AF, (x_AD, w_EDF, group_sizes_E)


def _backward(out_dtype, interpret, residuals, dy_AF):
  del out_dtype
  x_AD, w_EDF, group_sizes_E = residuals
  a, d = x_AD.shape
  dx_AD = _gmm(dy_AF, w_EDF, group_sizes_E, x_AD.dtype, interpret, transpose_rhs=True)
  # tgmm: dw[g] = x_g^T @ dy_g; the padding rows are in no group, so add nothing.
  tiles = tiling(a, d, w_EDF.shape[2])
  dw_EDF = _megablox.tgmm(_pad_rows(x_AD, tiles[0]).T, _pad_rows(dy_AF, tiles[0]),
                          group_sizes_E, preferred_element_type=w_EDF.dtype, tiling=tiles,
                          num_actual_groups=w_EDF.shape[0], interpret=interpret)
  return dx_AD, dw_EDF, None


grouped_matmul.defvjp(_forward, _backward)
