"""Post-training quantization of one linear layer from calibration inputs: GPTQ and AWQ.

Both return model/quant.py's `Quantized` (same codes, scales and zeros as its round-to-nearest
`quantize`, so `.astype` dequantizes them and the quantized-matmul kernels take them); they only
choose the codes better. Letters as in model/quant.py: a weight is seen as [*batch, K, N], K its
input (contracted) size, N its output size; M counts calibration rows (tokens).

GPTQ (Frantar et al. 2022, Alg. 1) quantizes the K input rows of W one at a time and spreads each
row's rounding error over the rows not yet quantized, weighted by the inverse Hessian of the
layer's squared output error, H = 2 X^T X. AWQ (Lin et al. 2023, Sec. 3) instead scales the
input channels the activations use most, W -> W diag(s), x -> x / s, before round-to-nearest,
with s = mean|x|^alpha and alpha searched on the calibration inputs; the caller folds 1/s into
the op before the layer (`fold_into_norm`), then clips each group's range where that lowers the
output error (`awq_clip`).

The model-wide driver (collecting each layer's inputs, folding the scales) is not here.
"""

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from model import quant


@flax.struct.dataclass
class Hessian:
  """GPTQ's 2 X^T X of one layer's calibration inputs, h [*batch, K, K] f32. A type of its own so
  that `gptq` never mistakes a K x K Hessian for K calibration rows; sums over batches of
  calibration data (`h1 + h2`, `sum(...)`)."""
  h: jax.Array

  def __add__(self, other):
    if isinstance(other, int) and other == 0:  # sum()'s start
      return self
    return Hessian(self.h + other.h)

  __radd__ = __add__


def hessian(x, *, n_batch: int = 0, n_in: int = 1) -> Hessian:
  """2 X^T X of calibration inputs x [*batch, *rows, *in] (a layer's input activations: any
  number of row axes between `n_batch` leading batch axes and the `n_in` input axes)."""
  x = jnp.asarray(x, jnp.float32)
  batch, ins = x.shape[:n_batch], x.shape[x.ndim - n_in:]
  x = x.reshape(*batch, -1, math.prod(ins))
  return Hessian(2.0 * jnp.einsum("...MK,...MJ->...KJ", x, x,
                                  precision=jax.lax.Precision.HIGHEST))


def _layout(shape, kind, group, n_batch, n_in, symmetric):
  """(batch, ins, out, K, N, group) of a weight, with quant.quantize's checks and messages."""
  if kind not in quant.KINDS:
    raise ValueError(f"quantization kind {kind!r} is not one of {quant.KINDS}")
  batch, ins, out = shape[:n_batch], shape[n_batch:n_batch + n_in], shape[n_batch + n_in:]
  k, n = math.prod(ins), math.prod(out)
  group = group or k
  if k % group:
    raise ValueError(f"quantization group {group} does not divide the input size {k} of a "
                     f"weight of shape {shape}")
  if quant.BITS[kind] == 4 and ins[-1] % 2:
    raise ValueError(f"{kind} packs two values a byte along the last input axis, of odd size "
                     f"{ins[-1]} in a weight of shape {shape}")
  if not symmetric and kind != "int4":
    raise ValueError(f"asymmetric quantization is for int4, not {kind}")
  return batch, ins, out, k, n, group


def _calibration_rows(x, batch, ins, shape):
  """x [*batch, *rows, *in] (or [*batch, *rows, K]) as [*batch, M, K]."""
  x = jnp.asarray(x)
  k, b = math.prod(ins), len(batch)
  lead = x.shape[:b]
  if lead == batch and x.ndim > b + len(ins) and x.shape[x.ndim - len(ins):] == ins:
    return x.reshape(*batch, -1, k)
  if lead == batch and x.ndim > b + 1 and x.shape[-1] == k:
    return x.reshape(*batch, -1, k)
  raise ValueError(f"calibration inputs of shape {x.shape} should be [*batch, rows..., *in] = "
                   f"[{', '.join(map(str, batch + ('M',) + ins))}] (or end in the input size "
                   f"{k}) for a weight of shape {shape}")


# The quantizer of model/quant.py, written per group of input rows [g, N] so GPTQ can call it on
# rows that errors have already moved (same formulas, so the codes are quantize's convention).
def _stats(x_gN, kind, symmetric):
  """(scale [N], zero [N]) of one group of rows, as quant.quantize computes them."""
  if kind == "nf4" or symmetric:
    top = 1.0 if kind == "nf4" else 2 ** (quant.BITS[kind] - 1) - 1
    s = jnp.max(jnp.abs(x_gN), axis=0) / top
    return jnp.where(s > 0, s, 1.0), jnp.zeros_like(s)
  lo = jnp.minimum(jnp.min(x_gN, axis=0), 0.0)
  hi = jnp.maximum(jnp.max(x_gN, axis=0), 0.0)
  s = (hi - lo) / 15.0
  s = jnp.where(s > 0, s, 1.0)
  return s, jnp.clip(jnp.round(-lo / s), 0, 15)


def _round(w_N, s_N, z_N, kind, symmetric):
  """(codes int32 [N], the dequantized row [N]) of one row, as quantize then astype."""
  if kind == "nf4":
    book = jnp.asarray(quant.NF4)
    codes = jnp.argmin(jnp.abs((w_N / s_N)[:, None] - book), axis=-1)
    return codes, book[codes] * s_N
  if symmetric:
    top = 2 ** (quant.BITS[kind] - 1) - 1
    codes = jnp.clip(jnp.round(w_N / s_N), -top, top)
    return codes.astype(jnp.int32), codes * s_N
  codes = jnp.clip(jnp.round(w_N / s_N) + z_N, 0, 15)
  return codes.astype(jnp.int32), (codes - z_N) * s_N


# One compile for each, not one for each of their ops.
_pack_int4 = jax.jit(quant.pack_int4, static_argnames="axis")
_quantize = jax.jit(quant.quantize, static_argnames=("kind", "group", "n_batch", "n_in",
                                                     "symmetric", "double_quant"))


def _assemble(codes, scales, zeros, kind, group, shape, n_batch, n_in, dtype):
  """A Quantized from codes [*batch, K, N] and scales, zeros [*batch, K / group, N]."""
  batch, out = shape[:n_batch], shape[n_batch + n_in:]
  codes = jnp.asarray(codes).reshape(shape)
  values = (codes.astype(jnp.int8) if quant.BITS[kind] == 8
            else _pack_int4(codes, axis=n_batch + n_in - 1))
  as_out = lambda a: jnp.asarray(a, jnp.float32).reshape(*batch, -1, *out)
  return quant.Quantized(values, as_out(scales), None if zeros is None else as_out(zeros),
                         kind=kind, group=group, n_in=n_in, n_out=len(shape) - n_batch - n_in,
                         dtype=jnp.dtype(dtype))


# ---------------------------------------------------------------------------------------- GPTQ

_SUB = 16  # rows a sub-block: quantized one at a time, moving only each other
_PHASES = 4  # loops over the blocks, each on the rows the earlier ones left (at 8+ blocks each)


def _inverse_cholesky(h_KK, damp):
  """GPTQ's preparation of H (Alg. 1 and its reference code), in float64 on the host: a dead
  input (H_ii = 0, never active in calibration) gets H_ii = 1 (and the caller zeroes its weight
  row); then damp * mean(diag H) on the diagonal. Returns (U, dead [K] bool), U the upper
  Cholesky factor of H^-1 (H^-1 = U^T U): row i of U holds the weights by which row i's error
  moves the rows after it.

  U is computed without forming H^-1: with J the reversal, J H J = L L^T gives H = R R^T for the
  upper R = J L J, so U = R^-1 = J L^-1 J (one Cholesky and one triangular inverse, K^3 / 3
  each; the same U as the paper's cholesky(inverse(H)), the factor being unique)."""
  h = np.array(h_KK, np.float64)
  diag = np.diagonal(h).copy()
  if not diag.any():  # no calibration rows reached this weight (an unrouted expert): plain RTN
    h, diag = np.eye(len(h)), np.ones(len(h))
  dead = diag == 0
  h[dead, dead] = 1.0
  h[np.diag_indices_from(h)] += damp * np.mean(np.diagonal(h))
  try:
    lower = scipy.linalg.cholesky(h[::-1, ::-1], lower=True)
  except np.linalg.LinAlgError as e:
    raise np.linalg.LinAlgError(f"GPTQ: the damped Hessian [{len(h)}, {len(h)}] is not positive "
                                f"definite ({e}); raise damp (now {damp})") from e
  inv, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
  if info:
    raise np.linalg.LinAlgError(f"GPTQ: triangular inverse failed (LAPACK info {info})")
  return np.ascontiguousarray(inv[::-1, ::-1]), dead


@functools.partial(jax.jit, static_argnames=("kind", "symmetric", "group", "block", "sub",
                                             "phases", "dynamic"))
def _gptq_loop(w_KN, u_KK, gid_K, unperm, *, kind, symmetric, group, block, sub, phases,
               dynamic):
  """GPTQ's loop (Alg. 1) over the K rows of w; returns (codes [K, N], scale, zero [G, N]).

  Lazy batches on two levels: rows of `sub` are quantized one by one, each moving only the rest
  of its sub-block (the paper's per-row update, on a slice that stays in cache); a sub-block's
  errors then move the rest of its `block` in one matmul, and a block's errors the rest of W.
  Exact: every row has all earlier rows' updates by the time it is read. sub | block | K.

  Row i takes its scale and zero from row gid[i] of the tables. With `dynamic` a table row is
  filled from the current (error-updated) rows of its group when the loop reaches the group's
  first row; then either group is a multiple of block (groups start at a block's first row) or
  block of group and group of sub (groups start at a sub-block, inside a block). Otherwise the
  tables come from the unquantized groups of w[unperm] (the original row order), plus a row for
  the padding."""
  k, n = w_KN.shape
  if dynamic:
    scale, zero = jnp.ones((k // group, n)), jnp.zeros((k // group, n))
  else:
    g = unperm.shape[0] // group
    scale, zero = jax.vmap(lambda r: _stats(r, kind, symmetric))(
        w_KN[unperm].reshape(g, group, n))
    scale = jnp.concatenate([scale, jnp.ones((1, n))])
    zero = jnp.concatenate([zero, jnp.zeros((1, n))])
  highest = jax.lax.Precision.HIGHEST

  def refresh(src_gN, j, scale, zero, new):
    s, z = _stats(src_gN, kind, symmetric)
    return (scale.at[j].set(jnp.where(new, s, scale[j])),
            zero.at[j].set(jnp.where(new, z, zero[j])))

  def quantize_rows(i0, ws, us, scale, zero):
    """Rows i0 + [0, sub): ws [sub, N] and us [sub, sub], U's block on them. (codes, errors)."""
    def row(i, c):
      ws, qs, es = c
      j = gid_K[i0 + i]
      code, deq = _round(ws[i], scale[j], zero[j], kind, symmetric)
      err = (ws[i] - deq) / us[i, i]
      # us is upper triangular: rows before i are untouched, and row i becomes deq.
      ws = ws - us[i][:, None] * err[None, :]
      return ws, qs.at[i].set(code), es.at[i].set(err)
    init = (ws, jnp.zeros((sub, n), jnp.int32), jnp.zeros((sub, n), jnp.float32))
    _, qs, es = jax.lax.fori_loop(0, sub, row, init)
    return qs, es

  def one_block(i1, row0, c):
    """The block at row i1, on w's rows from row0 (static) on: what is left to move."""
    w, q, scale, zero = c
    r1 = i1 - row0
    w1 = jax.lax.dynamic_slice_in_dim(w, r1, block)
    u_rows = jax.lax.dynamic_slice(u_KK, (i1, row0), (block, k - row0))
    u1 = jax.lax.dynamic_slice_in_dim(u_rows, r1, block, axis=1)
    if dynamic and group >= block:
      # A group starts here or earlier: w's rows from i1 on have every earlier block's update.
      scale, zero = refresh(jax.lax.dynamic_slice_in_dim(w, r1, group), i1 // group, scale,
                            zero, i1 % group == 0)

    def one_sub(si, c):
      w1, q1, e1, scale, zero = c
      r = si * sub
      if dynamic and group < block:
        scale, zero = refresh(jax.lax.dynamic_slice_in_dim(w1, r, group), (i1 + r) // group,
                              scale, zero, r % group == 0)
      u_sub = jax.lax.dynamic_slice_in_dim(u1, r, sub)  # [sub, block]
      qs, es = quantize_rows(i1 + r, jax.lax.dynamic_slice_in_dim(w1, r, sub),
                             jax.lax.dynamic_slice_in_dim(u_sub, r, sub, axis=1), scale, zero)
      # The sub-block's own rows move too; they are never read again.
      w1 = w1 - jnp.einsum("sB,sN->BN", u_sub, es, precision=highest)
      return (w1, jax.lax.dynamic_update_slice_in_dim(q1, qs, r, 0),
              jax.lax.dynamic_update_slice_in_dim(e1, es, r, 0), scale, zero)

    init = (w1, jnp.zeros((block, n), jnp.int32), jnp.zeros((block, n), jnp.float32), scale,
            zero)
    _, q1, e1, scale, zero = jax.lax.fori_loop(0, block // sub, one_sub, init)
    # Once per block, the rest of W (and the block's own rows, never read again: a fixed shape
    # keeps the loop one compiled body; rows before the block have zero weight, U being upper).
    w = w - jnp.einsum("bK,bN->KN", u_rows, e1, precision=highest)
    return w, jax.lax.dynamic_update_slice_in_dim(q, q1, i1, 0), scale, zero

  # That last update is a K x block x N matmul where only the rows after the block need one:
  # in `phases` loops, each over the rows the earlier ones left, it does (1 + 1 / phases) / 2
  # of the full-K work instead of all of it.
  nb = k // block
  starts = [nb * p // phases for p in range(phases + 1)]
  carry = (w_KN, jnp.zeros((k, n), jnp.int32), scale, zero)
  for p in range(phases):
    row0 = starts[p] * block
    w, q, scale, zero = carry
    carry = jax.lax.fori_loop(starts[p], starts[p + 1],
                              lambda bi, c, row0=row0: one_block(bi * block, row0, c),
                              (w[row0 - (starts[p - 1] * block if p else 0):], q, scale, zero))
  _, q, scale, zero = carry
  return q, scale, zero


def _gptq_one(w_KN, h_KK, kind, group, symmetric, damp, block, act_order):
  """GPTQ of one [K, N] weight: (codes [K, N], scales [G, N], zeros [G, N])."""
  w = np.array(w_KN, np.float32)
  k, n = w.shape
  h = np.asarray(h_KK, np.float64)
  # act_order (the reference's "desc_act") quantizes inputs by decreasing H_ii. Groups are then
  # the original consecutive rows with scales from the unquantized W (the reference's
  # static_groups=True), so the result stays quant.py's layout; group = K is the same either way.
  perm = np.argsort(-np.diagonal(h), kind="stable") if act_order else np.arange(k)
  unperm = np.argsort(perm)
  u, dead = _inverse_cholesky(h[np.ix_(perm, perm)], damp)
  w = w[perm]
  w[dead] = 0.0
  dynamic = not (act_order or group == k)
  if not dynamic:
    size = min(block, k)
  elif group >= block:  # groups span whole blocks: a block size that divides the group
    size = max(d for d in range(1, block + 1) if group % d == 0)
  else:  # blocks of whole groups
    size = min(block // group * group, k)
  # Sub-blocks of up to 16 rows, whole ones in a block and, for groups inside a block, in a group.
  sub = max(d for d in range(1, min(_SUB, size) + 1)
            if size % d == 0 and (not dynamic or group >= size or group % d == 0))
  pad = -k % size  # dead rows after the last: no error reaches them, none comes from them
  gid = np.arange(k + pad) // group if dynamic else np.concatenate(
      [perm // group, np.full(pad, k // group)])  # padding: the tables' extra row
  u = np.pad(u, ((0, pad), (0, pad)))
  u[k:, k:] = np.eye(pad)
  phases = int(np.clip((k + pad) // size // 8, 1, _PHASES))
  q, scale, zero = _gptq_loop(np.pad(w, ((0, pad), (0, 0))), u.astype(np.float32),
                              gid.astype(np.int32), unperm.astype(np.int32), kind=kind,
                              symmetric=symmetric, group=group, block=size, sub=sub,
                              phases=phases, dynamic=dynamic)
  g = k // group
  return np.asarray(q)[:k][unperm], np.asarray(scale)[:g], np.asarray(zero)[:g]


def gptq(w, x_or_hessian, kind: str, group: int = 0, *, n_batch: int = 0, n_in: int = 1,
         symmetric: bool = True, damp: float = 0.01, block: int = 128,
         act_order: bool = False) -> quant.Quantized:
  """GPTQ (Frantar et al. 2022, Alg. 1) of w [*batch, *in, *out] (layout of quant.quantize).

  x_or_hessian: the layer's calibration inputs x [*batch, rows..., *in], or a `Hessian` of them
    (`hessian(x1) + hessian(x2) + ...`; h [*batch, K, K], an expert's from its own tokens).
  group: input rows a scale covers (0: all K, per output channel); a group's scale and zero come
    from its rows as already moved by earlier rows' errors, when the loop reaches its first row.
  damp: the fraction of mean(diag H) added to H's diagonal. block: rows per lazy batch update.
  act_order: quantize inputs by decreasing H_ii (then scales from the unquantized groups).
  """
  w = jnp.asarray(w)
  shape = tuple(w.shape)
  batch, ins, _, k, n, group = _layout(shape, kind, group, n_batch, n_in, symmetric)
  if isinstance(x_or_hessian, Hessian):
    h = jnp.asarray(x_or_hessian.h)
    if h.shape not in ((*batch, k, k), (k, k)):
      raise ValueError(f"GPTQ's Hessian has shape {h.shape}, not [*batch, K, K] = "
                       f"{(*batch, k, k)}, for a weight of shape {shape}")
  else:
    x = _calibration_rows(x_or_hessian, batch, ins, shape)
    h = hessian(x, n_batch=n_batch).h
  e = math.prod(batch)
  h = np.broadcast_to(np.asarray(h), (*batch, k, k)).reshape(e, k, k)
  w3 = np.asarray(w, np.float32).reshape(e, k, n)
  # One weight (one expert) at a time: each has its own Hessian, and memory stays one layer's.
  parts = [_gptq_one(w3[i], h[i], kind, group, symmetric, damp, block, act_order)
           for i in range(e)]
  codes, scales, zeros = (np.stack(p).reshape(*batch, *p[0].shape) for p in zip(*parts))
  return _assemble(codes, scales, None if symmetric or kind == "nf4" else zeros, kind, group,
                   shape, n_batch, n_in, w.dtype)


# ----------------------------------------------------------------------------------------- AWQ

def _pad_rows(x_MK):
  """x with zero rows up to a power of two: they add nothing to a squared output error, and
  the searches below compile once per size class, not once per count of rows (each expert of
  an MoE block has its own)."""
  m = x_MK.shape[0]
  return jnp.pad(x_MK, ((0, (1 << max(m - 1, 0).bit_length()) - m), (0, 0)))


@functools.partial(jax.jit, static_argnames=("kind", "group", "symmetric"))
def _awq_loss(ws, x_MK, s_K, *, kind, group, symmetric):
  """sum over ws of ||x W - (x / s) Q(diag(s) W)||^2, written x (W - Q(diag(s) W) / s) to keep
  f32 from cancelling two large outputs."""
  total = 0.0
  for w in ws:
    wq = quant.quantize(w * s_K[:, None], kind, group, symmetric=symmetric).astype(jnp.float32)
    err = jnp.einsum("MK,KN->MN", x_MK, w - wq / s_K[:, None],
                     precision=jax.lax.Precision.HIGHEST)
    total = total + jnp.sum(jnp.square(err))
  return total


def awq_scale(parts, kind: str = "int4", group: int = 128, *, n_in: int = 1,
              symmetric: bool = False, grid: int = 20):
  """AWQ's search (Lin et al. 2023, Sec. 3.2) of one per-input-channel scale s [*in] for
  weights that each take their own calibration inputs through one op (the experts of an MoE
  block, each on the tokens routed to it, behind one norm): parts [(ws, x)], ws weights
  [*in, *out_i] (no batch axes; the same input axes throughout) that all take x [rows..., *in].

  s = mean|x|^alpha over every part's rows, normalised by sqrt(max s * min s) as the reference
  code does, alpha in {0, 1/grid, ..., (grid - 1)/grid} minimising the summed squared output
  error of all weights on their own inputs, sum ||x W - (x / s) Q(W s)||^2 (alpha = 0 is
  round-to-nearest)."""
  parts = [([jnp.asarray(w) for w in ws], x) for ws, x in parts]
  if not parts or not all(ws for ws, _ in parts):
    raise ValueError("AWQ's scale search needs at least one weight in each part")
  first = parts[0][0][0]
  ins = tuple(first.shape[:n_in])
  for ws, _ in parts:
    for w in ws:
      if tuple(w.shape[:n_in]) != ins:
        raise ValueError(f"weights sharing an input need the same input axes {ins} (first "
                         f"weight), not those of a weight of shape {w.shape}")
  layouts = [_layout(tuple(w.shape), kind, group, 0, n_in, symmetric)
             for ws, _ in parts for w in ws]
  k, group = layouts[0][3], layouts[0][5]
  parts = [(tuple(w.astype(jnp.float32).reshape(k, -1) for w in ws),
            _calibration_rows(x, (), ins, tuple(ws[0].shape)).astype(jnp.float32))
           for ws, x in parts]
  rows = sum(x.shape[0] for _, x in parts)
  if rows == 0:
    raise ValueError("AWQ's scale search has no calibration rows")
  # The reference's get_act_scale, over all rows.
  x_mean = sum(jnp.sum(jnp.abs(x), axis=0) for _, x in parts) / rows
  parts = [(w2, _pad_rows(x)) for w2, x in parts if x.shape[0]]
  best, best_s = None, None
  for alpha in np.arange(grid) / grid:
    s = jnp.maximum(x_mean ** alpha, 1e-4)
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    loss = sum(float(_awq_loss(w2, x, s, kind=kind, group=group, symmetric=symmetric))
               for w2, x in parts)
    if best is None or loss < best:  # the first of equal losses: alpha = 0 before any other
      best, best_s = loss, s
  return best_s.reshape(ins)


def awq_shared(ws, x, kind: str = "int4", group: int = 128, *, n_in: int = 1,
               symmetric: bool = False, grid: int = 20):
  """AWQ (Lin et al. 2023, Sec. 3.2) of weights that share one input (q, k, v; gate and up):
  one per-input-channel scale s for all of them (`awq_scale`). Returns ([Quantized of w * s],
  s [*in]).

  ws: weights [*in, *out_i] (no batch axes; the same input axes). x: their calibration inputs
  [rows..., *in]. The layer is then (x / s) @ Q(W s): fold 1/s into the op that makes x
  (`fold_into_norm` for an RMSNorm). The reference's clipping search follows it separately
  (`awq_clip`).
  """
  ws = [jnp.asarray(w) for w in ws]
  if not ws:
    raise ValueError("awq_shared needs at least one weight")
  s = awq_scale([(ws, x)], kind, group, n_in=n_in, symmetric=symmetric, grid=grid)
  qs = [_quantize(w.astype(jnp.float32) * s.reshape(*s.shape, *(1,) * (w.ndim - n_in)),
                  kind, group, n_in=n_in, symmetric=symmetric).replace(dtype=w.dtype)
        for w in ws]
  return qs, s


def awq(w, x, kind: str = "int4", group: int = 128, *, n_in: int = 1, symmetric: bool = False,
        grid: int = 20):
  """AWQ of one weight w [*in, *out] on its calibration inputs x [rows..., *in]: (Quantized of
  w * s, s [*in]); `awq_shared` for the details."""
  (q,), s = awq_shared([w], x, kind, group, n_in=n_in, symmetric=symmetric, grid=grid)
  return q, s


@functools.partial(jax.jit, static_argnames=("kind", "group", "symmetric", "ratios"))
def _clip_search(w_KN, x_MK, *, kind, group, symmetric, ratios):
  k, n = w_KN.shape
  w_GkN = w_KN.reshape(k // group, group, n)
  x_MGk = x_MK.reshape(x_MK.shape[0], k // group, group)
  top_GN = jnp.max(jnp.abs(w_GkN), axis=1)
  best_err_GN, best_top_GN = None, top_GN
  for r in ratios:
    lim_G1N = (top_GN * r)[:, None]
    q_GkN = quant.quantize(jnp.clip(w_GkN, -lim_G1N, lim_G1N).reshape(k, n), kind, group,
                           symmetric=symmetric).astype(jnp.float32).reshape(w_GkN.shape)
    err_MGN = jnp.einsum("MGk,GkN->MGN", x_MGk, w_GkN - q_GkN,
                         precision=jax.lax.Precision.HIGHEST)
    err_GN = jnp.sum(jnp.square(err_MGN), axis=0)
    if best_err_GN is None:
      best_err_GN = err_GN
    else:  # strictly better only: ratio 1 (no clipping) wins ties
      better = err_GN < best_err_GN
      best_err_GN = jnp.where(better, err_GN, best_err_GN)
      best_top_GN = jnp.where(better, top_GN * r, best_top_GN)
  lim_G1N = best_top_GN[:, None]
  return jnp.clip(w_GkN, -lim_G1N, lim_G1N).reshape(k, n)


def awq_clip(w, x, kind: str = "int4", group: int = 128, *, n_in: int = 1,
             symmetric: bool = False, grid: int = 20, max_shrink: float = 0.5,
             max_rows: int = 512):
  """AWQ's clipping search (the reference code's auto_clip): each (input group, output) of w
  [*in, *out] is clipped to ±r·max|w| before round-to-nearest, with r in {1, 1 - 1/grid, ...,
  1 - (max_shrink·grid - 1)/grid} minimising that group's squared share of the output error
  on the calibration inputs x [rows..., *in] (at most `max_rows` of them, evenly strided).
  Returns w clipped, f32, its shape; quantize it as usual. w and x are the scaled ones
  (W diag(s), x / s) when it follows `awq_shared`. The reference skips q and k (their error
  reaches the output only through the softmax); so should the caller."""
  w = jnp.asarray(w, jnp.float32)
  _, ins, _, k, _, group = _layout(tuple(w.shape), kind, group, 0, n_in, symmetric)
  x = _calibration_rows(x, (), ins, tuple(w.shape)).astype(jnp.float32)
  x = x[::max(1, x.shape[0] // max_rows)][:max_rows]
  ratios = tuple(1.0 - i / grid for i in range(int(max_shrink * grid)))
  return _clip_search(w.reshape(k, -1), _pad_rows(x), kind=kind, group=group,
                      symmetric=symmetric, ratios=ratios).reshape(w.shape)


def fold_into_norm(norm_scale, s, norm_plus_one: bool = False):
  """The RMSNorm scale [D] that makes the norm's output x / s (AWQ's s [D] of the layers it
  feeds): w / s, or for Gemma's (1 + w) norm the w' with 1 + w' = (1 + w) / s. In the scale's
  dtype. Every layer that reads this norm must then take W * s (an unquantized one too, e.g. a
  router)."""
  w = jnp.asarray(norm_scale)
  w32, s = w.astype(jnp.float32), jnp.asarray(s, jnp.float32)
  new = (1.0 + w32) / s - 1.0 if norm_plus_one else w32 / s
  return new.astype(w.dtype)
