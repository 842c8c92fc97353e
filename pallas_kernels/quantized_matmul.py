"""Weight-only quantized matmul: y = x @ dequantize(W), W frozen as int8, int4 or NF4 codes.

  y_MN = quantized_matmul(x_MK, values, scales_GN, zeros_GN=None, kind=..., group=...)

W [K, N] is quantized in groups of `group` consecutive rows along K (the contraction axis),
G = K / group groups, each with its own scale per output column (group == K: per channel).
The conventions (`dequantize` is their one definition; the model's quantized tensors produce
these arrays):
  int8  values int8 [K, N]; W = values * scales (symmetric, no zeros).
  int4  values uint8 [K/2, N], two 4-bit codes a byte along K: byte i holds row 2i in its low
        nibble and row 2i + 1 in its high nibble. Symmetric (zeros None): a nibble is a
        two's-complement int in [-8, 7], W = q * s. Asymmetric (zeros [G, N]): a nibble is
        unsigned in [0, 15], W = (q - z) * s.
  nf4   the same packing; a nibble (unsigned) indexes the NF4 code book (QLoRA: Dettmers et
        al. 2023, Appendix E), W = NF4[q] * s.
scales (and zeros) f32 or bf16 [G, N]; x bf16 or f32 [M, K]; accumulation in f32.

The reference (`quantized_matmul_reference`, impl="xla") dequantizes W in jnp and does one dot,
which XLA may fuse into the dot's operand. The kernels read the quantized bytes and dequantize
a tile at a time in VMEM (TPU) or registers (GPU), so W never exists dequantized in HBM: decode
(M = 1..16 rows) is a matrix-vector product bound by the bytes of W it reads, 1/2 (int8) or 1/4
(int4, nf4) of bf16's.

Packed codes without interleaving: row 2i of W meets column 2i of x, so
  x @ W = x[:, 0::2] @ W_low + x[:, 1::2] @ W_high
where W_low and W_high [K/2, N] are the low and high nibbles of the bytes as stored. The
wrapper splits x's columns (M x K, small next to W at decode); the kernels do two dots on the
unpacked halves of each byte tile, and never shuffle rows. A nibble is unpacked on int32 after
widening: (b << 28) >> 28 and (b << 24) >> 28 sign-extend the low and high nibble, b & 15 and
(b >> 4) & 15 read them unsigned; NF4 looks its code up through a four-level select tree on the
nibble's bits (no gathers in either compiler).

TPU (Mosaic): grid (M tiles, N tiles, K tiles), K innermost ("arbitrary"), an f32 accumulator
in VMEM scratch. Each step loads an x tile, a tile of the weight bytes and the scales of its N
columns (all G rows, fetched once per N tile). A K tile lying in one group scales its product (on
[bm, bn], not [bk, bn]); a K tile of several groups scales the weights before the dot, its
scale rows stacked from the groups'. GPU (Triton): one program per (M tile, N tile, K split)
loops over K tiles that each lie in one group (`paths.qmm_block_k`), scaling each product.
Both dot in x's dtype (bf16, or f32 at HIGHEST precision) with an f32 accumulator. Edges: M and
N need not divide the tiles (TPU: partial edge blocks; GPU: masks); the K tile divides K.

Tiles (defaults; `BlockSizes` overrides them). TPU: decode (M <= 64) takes all M rows, N tiles
of 1024 and K tiles of 512 (int8) or 1024 (packed): 512 KiB of weight bytes a step, so few steps
(Pallas's TPU guide: ~0.35 us of fixed cost a grid step); M > 64 takes 512 x 512 output tiles
over the same K tiles. GPU: M <= 16 takes 16 x 64 output tiles (rows past M masked) and K tiles
of up to 256 rows, and splits K over programs until there are about GPU_PROGRAMS (partial sums
in f32, added by XLA), so that N / 64 tiles still fill the SMs; M <= 64 takes 64 x 64 and K 128;
larger M 128 x 128 and K 64 (3 pipeline stages fit an A100's shared memory). Speed is unmeasured
here: the tiles compile (tests/test_target_compile_kernels.py), nothing more is known of them.

Gradients: with respect to x only (custom_vjp: dx = dy @ W^T through `dequantize`, which XLA
fuses or materialises one layer at a time); W, its scales and zeros are frozen (QLoRA trains
adapters beside a frozen quantized base), their cotangents are zero.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paths import QMM_KINDS, dispatch, qmm_block_k, quantized_matmul_path

# QLoRA (Dettmers et al. 2023), Appendix E: the 16 NormalFloat-4 values, indexed by the nibble.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176636, 0.7229568362236328, 1.0)

GPU_MIN = 16  # tl.dot needs every dimension >= 16
GPU_PROGRAMS = 256  # decode: K splits until about this many programs (H100: 132 SMs)
_NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the kernels; None takes the default for the variant and M (module docstring).
  They change speed, never results (beyond f32 summation order).

  block_m: rows of x a tile (TPU: a multiple of 8, or M; GPU: a power of two >= 16).
  block_n: columns of W a tile (TPU: a multiple of 128, or N; GPU: a power of two >= 16).
  block_k: the most rows of W a step; the tile is `paths.qmm_block_k` of it.
  split_k (GPU): programs sharing the K loop of an output tile.
  """
  block_m: int | None = None
  block_n: int | None = None
  block_k: int | None = None
  split_k: int | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      n = getattr(self, f.name)
      if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"BlockSizes.{f.name} must be a positive int or None, got {n!r}")


# ------------------------------------------------------------------------------- conventions


def unpack_int4(values, signed):
  """uint8 [K/2, N] of packed nibbles -> int8 [K, N]: row 2i from byte i's low nibble, row
  2i + 1 from its high nibble; signed: two's complement [-8, 7], else [0, 15]."""
  b = values.astype(jnp.int32) & 0xFF  # int8 bytes read as their unsigned bits too
  lo, hi = b & 0xF, b >> 4
  if signed:
    lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
  k2, n = values.shape
  return jnp.stack([lo, hi], axis=1).reshape(2 * k2, n).astype(jnp.int8)


def _codes_rows(values, kind, asymmetric):
  """f32 [K, N]: the value each code stands for before scaling (q, or NF4[q])."""
  if kind == "int8":
    return values.astype(jnp.float32)
  q = unpack_int4(values, signed=kind == "int4" and not asymmetric)
  if kind == "nf4":
    return jnp.asarray(NF4_CODE, jnp.float32)[q.astype(jnp.int32)]
  return q.astype(jnp.float32)


def dequantize(values, scales, zeros, kind, group, dtype):
  """W [K, N] in dtype from its codes (int8 [K, N], or uint8 [K/2, N] packed), scales [G, N]
  and, for asymmetric int4, zeros [G, N]; G = K / group. Computed in f32, then cast."""
  q = _codes_rows(values, kind, zeros is not None)
  k, n = q.shape
  q = q.reshape(k // group, group, n)
  if zeros is not None:
    q = q - zeros.astype(jnp.float32)[:, None, :]
  return (q * scales.astype(jnp.float32)[:, None, :]).reshape(k, n).astype(dtype)


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def quantized_matmul_reference(x_MK, values, scales_GN, zeros_GN=None, *, kind, group,
                               out_dtype=None):
  """x @ dequantize(W) in plain jnp: W in x's dtype, one dot, f32 accumulation."""
  w_KN = dequantize(values, scales_GN, zeros_GN, kind, group, x_MK.dtype)
  y = lax.dot_general(x_MK, w_KN, _NN, precision=_precision(x_MK.dtype),
                      preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x_MK.dtype)


# ------------------------------------------------------------------- in-kernel unpacking


def _nf4(n):
  """NF4_CODE[n] for int32 nibbles n, as selects on n's bits (bit 0 picks within pairs)."""
  level = [jnp.float32(c) for c in NF4_CODE]
  for bit in range(4):
    on = (n & (1 << bit)) != 0
    level = [jnp.where(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
  return level[0]


def _tile_codes(v, kind, asymmetric):
  """The code values (f32) of a weight tile: [q] for int8, [q_low, q_high] for packed bytes
  (uint8), each the tile's shape. The shifts and masks hold for either widening of a byte."""
  b = v.astype(jnp.int32)
  if kind == "int8":
    return [b.astype(jnp.float32)]
  if kind == "int4" and not asymmetric:
    halves = [(b << 28) >> 28, (b << 24) >> 28]  # arithmetic shifts: [-8, 7]
  else:
    halves = [b & 0xF, (b >> 4) & 0xF]
  if kind == "nf4":
    return [_nf4(h) for h in halves]
  return [h.astype(jnp.float32) for h in halves]


def _split_x(x_MK, kind):
  """The x operands of a kernel: x, or its even and odd columns (meeting the low and high
  nibbles)."""
  return (x_MK,) if kind == "int8" else (x_MK[:, 0::2], x_MK[:, 1::2])


# ------------------------------------------------------------------------------------ TPU


def _tpu_kernel(*refs, kind, asymmetric, n_x, groups_per_tile, rows_per_group,
                tiles_per_group, precision):
  """One (M tile, N tile, K tile) step: acc += x_tile @ dequantized W tile."""
  x_refs, (v_ref, s_ref) = refs[:n_x], refs[n_x:n_x + 2]
  z_ref = refs[n_x + 2] if asymmetric else None
  o_ref, acc_ref = refs[-2:]
  k, last = pl.program_id(2), pl.num_programs(2) - 1
  dtype = x_refs[0].dtype

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  codes = _tile_codes(v_ref[...], kind, asymmetric)
  dot = lambda x, w: lax.dot_general(x, w.astype(dtype), _NN, precision=precision,
                                     preferred_element_type=jnp.float32)
  if groups_per_tile == 1:  # the tile lies in one group: scale the [bm, bn] product
    g = lax.div(k, tiles_per_group)  # (jnp's // emits sign ops Mosaic asks the device about)
    if asymmetric:
      codes = [c - z_ref[pl.ds(g, 1), :] for c in codes]
    part = sum(dot(x_ref[...], c) for x_ref, c in zip(x_refs, codes))
    acc_ref[...] += part * s_ref[pl.ds(g, 1), :]
  else:  # whole groups: scale rows stacked from the groups' rows of scales
    g0 = k * groups_per_tile

    def rows(ref):
      return jnp.concatenate([jnp.broadcast_to(ref[pl.ds(g0 + t, 1), :],
                                               (rows_per_group, ref.shape[1]))
                              for t in range(groups_per_tile)], axis=0)

    s = rows(s_ref)
    if asymmetric:
      z = rows(z_ref)
      codes = [c - z for c in codes]
    acc_ref[...] += sum(dot(x_ref[...], c * s) for x_ref, c in zip(x_refs, codes))

  @pl.when(k == last)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _tpu_tiles(kind, m, k, n, group, blocks):
  small = m <= 64
  bm = blocks.block_m or (m if small else 512)
  bn = blocks.block_n or (1024 if small else 512)
  bk = blocks.block_k or (512 if kind == "int8" else 1024)
  bm = m if bm >= m else bm
  bn = n if bn >= n else bn
  if bm % 8 and bm != m or bn % 128 and bn != n:  # Mosaic's (8, 128) tiles, or a whole axis
    raise ValueError(f"TPU tiles of x [M={m}, K] and W [K, N={n}]: block_m must be a multiple "
                     f"of 8 or >= M, block_n a multiple of 128 or >= N; got {blocks}")
  return bm, bn, qmm_block_k("tpu", kind, k, group, bk) or qmm_block_k("tpu", kind, k, group, k)


def _qmm_tpu(x_MK, values, scales_GN, zeros_GN, *, kind, group, out_dtype, blocks, interpret):
  m, k = x_MK.shape
  n = values.shape[1]
  bm, bn, bk = _tpu_tiles(kind, m, k, n, group, blocks)
  xs = _split_x(x_MK, kind)
  packed = kind != "int8"
  bk_x = bk // 2 if packed else bk  # columns of each x operand, rows of values, a tile
  rows_per_group = group // 2 if packed else group
  side = [scales_GN.astype(jnp.float32)]
  if zeros_GN is not None:
    side.append(zeros_GN.astype(jnp.float32))
  kernel = functools.partial(
      _tpu_kernel, kind=kind, asymmetric=zeros_GN is not None, n_x=len(xs),
      groups_per_tile=max(1, bk // group), rows_per_group=rows_per_group,
      tiles_per_group=max(1, group // bk), precision=_precision(x_MK.dtype))
  g = scales_GN.shape[0]
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), k // bk),
      in_specs=([pl.BlockSpec((bm, bk_x), lambda i, j, kk: (i, kk))] * len(xs)
                + [pl.BlockSpec((bk_x, bn), lambda i, j, kk: (kk, j))]
                + [pl.BlockSpec((g, bn), lambda i, j, kk: (0, j))] * len(side)),
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="quantized_matmul",
  )(*xs, values, *side)


# ------------------------------------------------------------------------------------ GPU


def _gpu_kernel(*refs, kind, asymmetric, n_x, m, n, bm, bn, bk, steps, steps_per_split, group,
                precision):
  """One (M tile, N tile, K split): loop over its K tiles, each in one group."""
  x_refs, (v_ref, s_ref) = refs[:n_x], refs[n_x:n_x + 2]
  z_ref = refs[n_x + 2] if asymmetric else None
  o_ref = refs[-1]
  i, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  row0, col0 = i * bm, j * bn
  rows_ok = (row0 + lax.iota(jnp.int32, bm) < m)[:, None]
  cols_ok = col0 + lax.iota(jnp.int32, bn) < n
  packed = kind != "int8"
  bk_x = bk // 2 if packed else bk
  dtype = x_refs[0].dtype

  def body(t, acc_MN):
    g = lax.div(t * bk, group)
    v = plgpu.load(v_ref.at[pl.ds(t * bk_x, bk_x), pl.ds(col0, bn)], mask=cols_ok[None, :],
                   other=0)
    codes = _tile_codes(v, kind, asymmetric)
    if asymmetric:
      z = plgpu.load(z_ref.at[g, pl.ds(col0, bn)], mask=cols_ok, other=0)
      codes = [c - z[None, :] for c in codes]
    part = 0
    for x_ref, c in zip(x_refs, codes):
      x = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(t * bk_x, bk_x)], mask=rows_ok, other=0)
      part += lax.dot_general(x, c.astype(dtype), _NN, precision=precision,
                              preferred_element_type=jnp.float32)
    s = plgpu.load(s_ref.at[g, pl.ds(col0, bn)], mask=cols_ok, other=0)
    return acc_MN + part * s[None, :]

  # Typed bounds (Python ints gave Triton's scf.for bounds of different types).
  lo = split * jnp.int32(steps_per_split)
  hi = jnp.minimum(lo + jnp.int32(steps_per_split), jnp.int32(steps))
  acc_MN = lax.fori_loop(lo, hi, body, jnp.zeros((bm, bn), jnp.float32))
  tile = (pl.ds(row0, bm), pl.ds(col0, bn))
  out = o_ref.at[(split, *tile)] if len(o_ref.shape) == 3 else o_ref.at[tile]
  plgpu.store(out, acc_MN.astype(o_ref.dtype), mask=rows_ok & cols_ok[None, :])


def _pow2_fit(block, size):
  return min(block, max(GPU_MIN, pl.next_power_of_2(size)))


def _gpu_tiles(kind, m, k, n, group, blocks):
  if m <= 16:
    bm, bn, bk = 16, 64, 256
  elif m <= 64:
    bm, bn, bk = 64, 64, 128
  else:
    bm, bn, bk = 128, 128, 64
  for given in (blocks.block_m, blocks.block_n):
    if given is not None and (given < GPU_MIN or given & (given - 1)):
      raise ValueError(f"GPU tiles: block_m and block_n must be powers of two >= {GPU_MIN}; "
                       f"got {blocks}")
  bm = _pow2_fit(blocks.block_m or bm, m)
  bn = _pow2_fit(blocks.block_n or bn, n)
  bk = qmm_block_k("gpu", kind, k, group, blocks.block_k or bk)
  steps = k // bk
  split = blocks.split_k or (1 if m > 64 else
                             -(-GPU_PROGRAMS // (pl.cdiv(m, bm) * pl.cdiv(n, bn))))
  steps_per_split = -(-steps // max(1, min(split, steps)))
  return bm, bn, bk, steps, steps_per_split


def _qmm_gpu(x_MK, values, scales_GN, zeros_GN, *, kind, group, out_dtype, blocks, interpret):
  m, k = x_MK.shape
  n = values.shape[1]
  bm, bn, bk, steps, steps_per_split = _gpu_tiles(kind, m, k, n, group, blocks)
  splits = -(-steps // steps_per_split)
  xs = _split_x(x_MK, kind)
  side = [scales_GN.astype(jnp.float32)]
  if zeros_GN is not None:
    side.append(zeros_GN.astype(jnp.float32))
  kernel = functools.partial(
      _gpu_kernel, kind=kind, asymmetric=zeros_GN is not None, n_x=len(xs), m=m, n=n, bm=bm,
      bn=bn, bk=bk, steps=steps, steps_per_split=steps_per_split, group=group,
      precision=_precision(x_MK.dtype))
  # Several splits write f32 partial sums [splits, M, N], added below.
  out_shape = ((splits, m, n), jnp.float32) if splits > 1 else ((m, n), out_dtype)
  y = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), splits),
      out_shape=jax.ShapeDtypeStruct(*out_shape),
      compiler_params=plgpu.CompilerParams(num_warps=4 if bm * bn <= 64 * 128 else 8,
                                           num_stages=3 if x_MK.dtype.itemsize <= 2 else 2),
      interpret=bool(interpret),  # TPU interpret params mean plain interpret here
      name="quantized_matmul",
  )(*xs, values, *side)
  return y.sum(0).astype(out_dtype) if splits > 1 else y


# ---------------------------------------------------------------------------------- public


@dataclasses.dataclass(frozen=True)
class _Static:
  kind: str
  group: int
  impl: str
  interpret: object
  backend: str | None
  out_dtype: jnp.dtype
  x_dtype: jnp.dtype
  blocks: BlockSizes


def _forward(x_MK, values, scales_GN, zeros_GN, cfg):
  k = x_MK.shape[1]
  statics = dict(kind=cfg.kind, group=cfg.group, out_dtype=cfg.out_dtype, blocks=cfg.blocks)
  xla = lambda x, v, s, z: quantized_matmul_reference(x, v, s, z, kind=cfg.kind,
                                                      group=cfg.group, out_dtype=cfg.out_dtype)

  def kernel(variant, interpret):
    forced = cfg.backend is not None or bool(interpret)
    path = quantized_matmul_path("tpu" if variant == "tpu" else "cuda", x_dtype=x_MK.dtype,
                                 kind=cfg.kind, k=k, group=cfg.group, impl="pallas")
    if path.impl == "xla":
      if forced:
        raise ValueError(f"quantized_matmul(impl='pallas', backend={variant!r}): {path.reason}")
      return xla  # never lowered (the path sends that platform to XLA): platform_dependent
                  # traces every branch
    fn = _qmm_tpu if variant == "tpu" else _qmm_gpu
    return functools.partial(fn, interpret=interpret, **statics)

  path_of = lambda platform: quantized_matmul_path(platform, x_dtype=x_MK.dtype, kind=cfg.kind,
                                                   k=k, group=cfg.group, impl=cfg.impl)
  return dispatch((x_MK, values, scales_GN, zeros_GN), impl=cfg.impl, interpret=cfg.interpret,
                  backend=cfg.backend, path_of=path_of, kernel=kernel, xla=xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qmm(x_MK, values, scales_GN, zeros_GN, cfg):
  return _forward(x_MK, values, scales_GN, zeros_GN, cfg)


def _qmm_fwd(x_MK, values, scales_GN, zeros_GN, cfg):
  y = _forward(x_MK, values, scales_GN, zeros_GN, cfg)
  return y, (values, scales_GN, zeros_GN)


def _qmm_bwd(cfg, res, dy_MN):
  values, scales_GN, zeros_GN = res
  dtype = cfg.x_dtype
  w_KN = dequantize(values, scales_GN, zeros_GN, cfg.kind, cfg.group, dtype)
  dx_MK = lax.dot_general(dy_MN.astype(dtype), w_KN, (((1,), (1,)), ((), ())),
                          precision=_precision(dtype), preferred_element_type=jnp.float32)
  # The quantized weights are frozen: zero cotangents for values, scales and zeros.
  return dx_MK.astype(dtype), None, None, None


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def _check(x, values, scales, zeros, kind, group):
  if kind not in QMM_KINDS:
    raise ValueError(f"kind must be one of {QMM_KINDS}, got {kind!r}")
  if x.ndim < 1 or values.ndim != 2 or scales.ndim != 2:
    raise ValueError(f"quantized_matmul expects x [..., K], values 2-D, scales [G, N]; got x "
                     f"{x.shape}, values {values.shape}, scales {scales.shape}")
  k, n = x.shape[-1], values.shape[1]
  packed = kind != "int8"
  want = (jnp.uint8 if packed else jnp.int8)
  if values.dtype != want:
    raise ValueError(f"kind={kind!r} stores values as {jnp.dtype(want).name}, got "
                     f"{values.dtype}")
  rows = k // 2 if packed else k
  if values.shape[0] != rows or (packed and k % 2):
    raise ValueError(f"kind={kind!r} with x [..., K={k}] needs values [{'K/2' if packed else 'K'}"
                     f"={rows}, N], got {values.shape}")
  if not isinstance(group, int) or group < 1 or k % group or (packed and group % 2):
    even = " and be even (bytes hold pairs of rows)" if packed else ""
    raise ValueError(f"group must divide K={k}{even}, got {group!r}")
  if scales.shape != (k // group, n):
    raise ValueError(f"scales must be [G=K/group={k // group}, N={n}], got {scales.shape}")
  if zeros is not None and (kind != "int4" or zeros.shape != scales.shape):
    raise ValueError(f"zeros (asymmetric int4 only) must be [G={k // group}, N={n}] like scales;"
                     f" got {zeros.shape} with kind={kind!r}")
  for name, a in (("x", x), ("scales", scales), ("zeros", zeros)):
    if a is not None and a.dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f"{name} must be float32 or bfloat16, got {a.dtype}")


@functools.partial(jax.jit, static_argnames=("kind", "group", "impl", "interpret", "out_dtype",
                                             "block_sizes", "backend"))
def quantized_matmul(x_MK, values, scales_GN, zeros_GN=None, *, kind, group, impl="auto",
                     interpret=False, out_dtype=None, block_sizes=None, backend=None):
  """x @ dequantize(W) -> [M, N] in out_dtype (default x's), accumulated in f32.

  x_MK [M, K] bf16 or f32 (leading dims beyond one are flattened into M and restored);
  values int8 [K, N] (kind "int8") or uint8 [K/2, N] (packed "int4", "nf4"); scales_GN
  [G, N] f32 or bf16, G = K / group; zeros_GN [G, N] for asymmetric int4, else None. The
  conventions are the module docstring's and `dequantize`'s.
  impl: "auto" (the platform's kernel where `paths.quantized_matmul_path` says it is
    compile-tested, decided for the platform the program is lowered for; XLA elsewhere),
    "xla" (the reference) or "pallas".
  interpret (impl="pallas"): run the kernel in the Pallas interpreter (tests, on CPU); a
    `pltpu.InterpretParams` selects TPU interpret mode for the TPU variant.
  backend (impl="pallas"): force the "tpu" (Mosaic) or "gpu" (Triton) variant wherever lowered.
  block_sizes: a `BlockSizes`; None takes the defaults.
  Differentiable in x only; values, scales and zeros get zero cotangents (frozen weights).
  """
  _check(x_MK, values, scales_GN, zeros_GN, kind, group)
  if backend not in (None, "tpu", "gpu"):
    raise ValueError(f"backend must be 'tpu', 'gpu' or None, got {backend!r}")
  lead, k = x_MK.shape[:-1], x_MK.shape[-1]
  cfg = _Static(kind, group, impl, interpret, backend,
                jnp.dtype(out_dtype or x_MK.dtype), x_MK.dtype, block_sizes or BlockSizes())
  y = _qmm(x_MK.reshape(-1, k), values, scales_GN, zeros_GN, cfg)
  return y.reshape(*lead, values.shape[1])
