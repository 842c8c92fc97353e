"""AdamW with 8-bit block-wise quantized moments (Dettmers et al. 2021, "8-bit Optimizers via
Block-wise Quantization").

Each step dequantizes Adam's moments to f32, updates them and computes the step exactly as
optax.scale_by_adam does, then quantizes them back: every block of `block` consecutive elements
keeps one f32 absmax and one byte per element, the index of the nearest value of a 256-entry
dynamic map (Sec. 2: signed for the first moment, unsigned for the second) after division by
that absmax (their Fig. 1). The moments take ~2 bytes per parameter instead of f32 AdamW's 8.

Layout, so the state shards like the parameters (train/state.py derives every state array's
sharding from the parameter's logical axis names):
  codes   uint8, the parameter's own shape: the rules table shards them as the parameter.
  absmax  f32 [..., ceil(last / block)]: blocks run along the last axis only (a last axis
          shorter than `block` is one block). A block never spans two indices of a leading
          axis, so it never straddles shards of the other axes (heads, layers, experts, fsdp
          rows): each device's codes find their absmax on that device. Only a sharded last
          axis whose shards are not whole blocks puts a block across devices: the step then
          all-reduces the (small) per-block max, never the moments, and where the shards are
          shorter than a block the absmax cannot be split with them and is replicated
          (a train.optimizer_block that divides the shard length avoids both).
Why not blocks of the flattened tensor: they would run across the heads or layers a mesh axis
splits, and their absmax would have no logical axes to shard by. Why a fixed block, not one
fitted to the mesh: the state's shapes must not depend on the mesh, so a run resumes on
another one.
Tensors under 4096 elements (norm scales, biases; bitsandbytes' threshold) or with a last
axis under 16 (a 4-byte absmax per few codes would save little) keep f32 moments, with a
[1, ..., 1] placeholder absmax so every state leaf has the parameter's rank and logical names.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

MIN_QUANTIZED_SIZE = 4096
_MIN_LAST_AXIS = 16


def dynamic_map(signed: bool) -> np.ndarray:
  """The 256 values of the dynamic (tree) data type, sorted: in [-1, 1] signed, [0, 1] not.

  Dettmers et al. 2021 ("dynamic tree quantization", from Dettmers 2016; "dynamic
  quantization" in Sec. 2 for the unsigned variant): after the sign bit, a code's bits are a
  run of e zeros (the decimal exponent: magnitude 10^-e), an indicator 1, then a linear
  fraction in the bits left. A short run leaves many fraction bits (fine steps near the block's
  absmax), a long run few (a range reaching down to 10^-6 of it). Here the fraction is the
  right end of one of 2^k equal bins of (0.1, 1], so decade e holds 2^k values in
  (10^-(e+1), 10^-e] and the largest value is exactly 1.

  Unsigned (Adam's second moment is never negative), the sign bit joins the tree: 8 bits give
  255 magnitudes in decades (1e-8, 1e-7] ... (0.1, 1] and, with no indicator at all, 0.
  Signed: 127 magnitudes down to 1e-6, their negatives and 0 are 255 values; the one code left
  over (the tree's "negative zero") is the next decade's single value, 1e-7. Including both 1
  and -1 keeps a block's largest element exact whatever its sign.
  """
  bits = 7 if signed else 8
  magnitudes = []
  for e in range(bits):  # e = the number of leading zeros
    k = bits - 1 - e  # fraction bits after the indicator bit
    j = np.arange(1, 2**k + 1)
    magnitudes.append(10.0**-e * (1 + 9 * j / 2**k) / 10)
  magnitudes = np.concatenate(magnitudes)
  values = [np.zeros(1), magnitudes]
  if signed:
    values += [-magnitudes, np.array([10.0**-bits])]
  out = np.sort(np.concatenate(values)).astype(np.float32)
  assert out.shape == (256,) and len(np.unique(out)) == 256
  return out


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)


def block_size(shape: tuple[int, ...], block: int) -> int:
  """Elements per block of a moment of `shape`: `block`, or the whole last axis if shorter."""
  return min(block, shape[-1])


def is_quantized(shape: tuple[int, ...]) -> bool:
  """Whether a parameter of `shape` gets 8-bit moments (else f32 ones)."""
  return (len(shape) >= 1 and int(np.prod(shape)) >= MIN_QUANTIZED_SIZE
          and shape[-1] >= _MIN_LAST_AXIS)


def absmax_shape(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
  """[..., ceil(last / block)] for a quantized moment of `shape`; [1, ..., 1] for an f32 one."""
  if not is_quantized(shape):
    return (1,) * len(shape)
  return (*shape[:-1], -(-shape[-1] // block_size(shape, block)))


def _blocks(x, block: int):
  """[..., n] -> [..., ceil(n / b), b], the last block padded with zeros."""
  b = block_size(x.shape, block)
  n, nb = x.shape[-1], -(-x.shape[-1] // b)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * b - n)])
  return x.reshape(*x.shape[:-1], nb, b)


def quantize(x: jax.Array, qmap: np.ndarray, block: int) -> tuple[jax.Array, jax.Array]:
  """x: f32 [..., n] -> (uint8 codes [..., n], f32 absmax [..., ceil(n / min(block, n))]).

  Each element becomes the index of the value of `qmap` (sorted, 256 entries) nearest to it
  divided by its block's absmax.
  """
  n = x.shape[-1]
  xb = _blocks(x.astype(jnp.float32), block)
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  scaled = xb / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  # Nearest code: count the midpoints between consecutive codes that lie below the value
  # (a binary search of 8 steps, never an [elements, 256] comparison).
  midpoints = jnp.asarray((qmap[1:] + qmap[:-1]) / 2)
  codes = jnp.searchsorted(midpoints, scaled, method="scan_unrolled").astype(jnp.uint8)
  codes = codes.reshape(*x.shape[:-1], -1)[..., :n]
  return codes, absmax


def dequantize(codes: jax.Array, absmax: jax.Array, qmap: np.ndarray, block: int) -> jax.Array:
  """codes: uint8 [..., n], absmax: f32 [..., nb] -> f32 [..., n]; `quantize` undone up to
  its rounding."""
  n = codes.shape[-1]
  values = jnp.asarray(qmap)[_blocks(codes, block).astype(jnp.int32)] * absmax[..., None]
  return values.reshape(*codes.shape[:-1], -1)[..., :n]


class ScaleByAdam8bitState(NamedTuple):
  """Per parameter: mu, nu are uint8 codes of its shape (or f32 moments when not quantized);
  mu_absmax, nu_absmax f32 [..., ceil(last / block)] (or [1, ..., 1], unused)."""
  count: jax.Array  # int32[]
  mu: Any
  mu_absmax: Any
  nu: Any
  nu_absmax: Any


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                       block: int = 256) -> optax.GradientTransformation:
  """optax.scale_by_adam with the moments stored in 8 bits (see the module docstring)."""
  if block < 1:
    raise ValueError(f"block={block} must be positive")
  zero_code = {True: int(np.flatnonzero(SIGNED_MAP == 0)[0]),
               False: int(np.flatnonzero(UNSIGNED_MAP == 0)[0])}

  def init_moment(p, signed):
    if not is_quantized(p.shape):
      return jnp.zeros(p.shape, jnp.float32)
    return jnp.full(p.shape, zero_code[signed], jnp.uint8)

  def init_absmax(p):
    return jnp.zeros(absmax_shape(p.shape, block), jnp.float32)

  def init_fn(params):
    # One tree.map per state array: mapping over flax's logical-axis boxes keeps each array
    # boxed with its parameter's names (train/state.py shards the state by them).
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: init_moment(p, True), params),
        mu_absmax=jax.tree.map(init_absmax, params),
        nu=jax.tree.map(lambda p: init_moment(p, False), params),
        nu_absmax=jax.tree.map(init_absmax, params))

  def load(stored, absmax, qmap):
    if not is_quantized(stored.shape):
      return stored
    return dequantize(stored, absmax, qmap, block)

  def store(moment, absmax, qmap):
    if not is_quantized(moment.shape):
      return moment, absmax
    return quantize(moment, qmap, block)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    bc1, bc2 = 1 - b1**count, 1 - b2**count
    treedef = jax.tree.structure(updates)
    flat = [treedef.flatten_up_to(t) for t in (updates, state.mu, state.mu_absmax, state.nu,
                                               state.nu_absmax)]
    out = {k: [] for k in ScaleByAdam8bitState._fields[1:]}
    new_updates = []
    for g, mu, mu_max, nu, nu_max in zip(*flat):
      g32 = g.astype(jnp.float32)
      m = b1 * load(mu, mu_max, SIGNED_MAP) + (1 - b1) * g32
      v = b2 * load(nu, nu_max, UNSIGNED_MAP) + (1 - b2) * g32**2
      # The step uses this step's exact f32 moments; only what is kept is rounded (Fig. 1).
      new_updates.append(((m / bc1) / (jnp.sqrt(v / bc2) + eps)).astype(g.dtype))
      for name, value in zip(("mu", "mu_absmax"), store(m, mu_max, SIGNED_MAP)):
        out[name].append(value)
      for name, value in zip(("nu", "nu_absmax"), store(v, nu_max, UNSIGNED_MAP)):
        out[name].append(value)
    new_state = ScaleByAdam8bitState(
        count=count, **{k: treedef.unflatten(v) for k, v in out.items()})
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4, mask=None, *,
               block: int = 256) -> optax.GradientTransformation:
  """optax.adamw's chain with 8-bit moments: the same decoupled weight decay and schedule."""
  return optax.chain(scale_by_adam_8bit(b1, b2, eps, block=block),
                     optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))
