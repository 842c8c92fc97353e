"""Quantized weights: a pytree the layers take wherever a weight goes.

Symmetric quantization: X_int = round(X / s), s = max|X| / (2^(b-1) - 1), dequantized as
X_int * s; asymmetric (int4 only): s = (max - min) / 15, z = round(-min / s), X_int =
clip(round(X / s) + z, 0, 15), dequantized as (X_int - z) * s; NF4 (QLoRA, Dettmers et al.
2023): s = max|X|, X_int the index of the nearest of 16 normal-quantile values to X / s.
The statistics are per group of `group` consecutive input (contracted) elements and per output
element: `group` = K, the whole input, is per output channel.

A weight of shape [*batch, *in, *out] (e.g. q [D, N, H]: in D, out N H; o [N, H, D]: in N H;
an MoE's gate [E, D, F]: batch E, in D) is seen as [*batch, K, N], K = prod(in), N = prod(out):
  values  int8 of the weight's shape ("int8"), or uint8 with the last input axis halved
          ("int4", "nf4": two 4-bit codes a byte, the even row of K in the low nibble),
  scales  [*batch, K / group, *out] floats, or `DoubleQuantized` (NF4's double quantization),
  zeros   [*batch, K / group, *out] floats (asymmetric int4), else None.
The layout is the Pallas kernels' (pallas_kernels/quantized_matmul.py); the leading axes keep the
weight's own, so the sharding rules split values as they split the weight.

`Quantized.astype(dtype)` is the dequantized weight, so code written for arrays
(`jnp.einsum(..., w.astype(dt))`) runs on quantized weights unchanged: under jit XLA fuses the
dequantization into the matmul's operand where it can.
"""

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import NF4_CODE, dequantize, unpack_int4

KINDS = ("int8", "int4", "nf4")
BITS = {"int8": 8, "int4": 4, "nf4": 4}
# QLoRA's NF4 code book (Appendix E): quantiles of N(0, 1) scaled to [-1, 1], 0 exact.
NF4 = np.array(NF4_CODE, np.float32)
DOUBLE_QUANT_BLOCK = 256  # QLoRA's block of second-level (scale) quantization


@flax.struct.dataclass
class DoubleQuantized:
  """Scales stored as int8 (QLoRA's double quantization): scales - offset, symmetric int8 per
  block of 256 consecutive scales, with f32 block maxima; offset is the scales' mean. Leading
  batch axes (stacked layers, experts) each have their own blocks and offset, so slicing them
  off every array leaves a DoubleQuantized of the slice."""
  codes: jax.Array  # int8 [*batch, ...], the scales' shape
  absmax: jax.Array  # f32 [*batch, ceil(size / 256)]
  offset: jax.Array  # f32 [*batch]

  @property
  def shape(self):
    return self.codes.shape

  def astype(self, dtype):
    batch = self.offset.shape
    flat = self.codes.reshape(*batch, -1).astype(jnp.float32)
    n = flat.shape[-1]
    blocks = _blocks(flat)
    scales = (blocks * (self.absmax[..., None] / 127.0)).reshape(*batch, -1)[..., :n]
    return (scales + self.offset[..., None]).reshape(self.codes.shape).astype(dtype)


def _blocks(flat):
  """[*batch, n] -> [*batch, ceil(n / 256), 256], zero-padded."""
  pad = (-flat.shape[-1]) % DOUBLE_QUANT_BLOCK
  flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
  return flat.reshape(*flat.shape[:-1], -1, DOUBLE_QUANT_BLOCK)


def double_quantize(scales, n_batch: int = 0) -> DoubleQuantized:
  scales = jnp.asarray(scales, jnp.float32)
  batch = scales.shape[:n_batch]
  flat = scales.reshape(*batch, -1)
  offset = jnp.mean(flat, axis=-1)
  blocks = _blocks(flat - offset[..., None])
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  step = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  codes = jnp.clip(jnp.round(blocks / step[..., None]), -127, 127).astype(jnp.int8)
  codes = codes.reshape(*batch, -1)[..., :flat.shape[-1]].reshape(scales.shape)
  return DoubleQuantized(codes, absmax, offset)


@flax.struct.dataclass
class Quantized:
  """A quantized weight (module docstring). `shape` and `dtype` are the weight's.

  The axes are counted from the end (n_out output axes, n_in input axes before them), so
  slicing leading axes off every array (a scan over stacked layers, one expert) leaves a
  Quantized of the slice."""
  values: jax.Array
  scales: jax.Array | DoubleQuantized
  zeros: jax.Array | None
  kind: str = flax.struct.field(pytree_node=False)
  group: int = flax.struct.field(pytree_node=False)
  n_in: int = flax.struct.field(pytree_node=False)
  n_out: int = flax.struct.field(pytree_node=False)
  dtype: jnp.dtype = flax.struct.field(pytree_node=False, default=jnp.dtype(jnp.float32))

  @property
  def shape(self) -> tuple:
    shape = list(self.values.shape)
    if BITS[self.kind] == 4:
      shape[-self.n_out - 1] *= 2  # the packed axis: the last input one
    return tuple(shape)

  @property
  def n_batch(self) -> int:
    return self.values.ndim - self.n_in - self.n_out

  @property
  def ndim(self) -> int:
    return self.values.ndim

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def scale_array(self, dtype=jnp.float32):
    return self.scales.astype(dtype)

  def codes(self):
    """The integer codes in the weight's shape: int8 (int8; symmetric int4 in [-8, 7]) or
    int8 in [0, 15] (asymmetric int4, nf4)."""
    if BITS[self.kind] == 8:
      return self.values
    m = matrix(self)
    one = lambda v: unpack_int4(v, signed=self.kind == "int4" and self.zeros is None)
    for _ in range(m.n_batch):
      one = jax.vmap(one)
    return one(m.values).reshape(self.shape)

  def astype(self, dtype):
    """The dequantized weight in dtype (pallas_kernels/quantized_matmul.py `dequantize`, the
    one definition of the codes, per matrix of the batch axes)."""
    m = matrix(self)
    one = lambda v, s, z: dequantize(v, s, z, self.kind, self.group, dtype)
    for _ in range(m.n_batch):
      one = jax.vmap(one)
    return one(m.values, m.scale_array(), m.zeros).reshape(self.shape)


def pack_int4(codes, axis: int):
  """uint8 with `axis` halved: element 2i in the low nibble, 2i + 1 in the high (codes in
  [-8, 15]; a negative code is stored as its two's-complement nibble). The inverse is
  pallas_kernels/quantized_matmul.py `unpack_int4`."""
  codes = jnp.moveaxis(jnp.asarray(codes).astype(jnp.int32) & 0xF, axis, 0)
  packed = codes[0::2] | (codes[1::2] << 4)
  return jnp.moveaxis(packed.astype(jnp.uint8), 0, axis)


def quantize(w, kind: str, group: int = 0, *, n_batch: int = 0, n_in: int = 1,
             symmetric: bool = True, double_quant: bool = False) -> Quantized:
  """Round-to-nearest quantization of w [*batch, *in, *out] (module docstring).

  group: input elements a scale covers; 0 is all of them (per output channel). symmetric=False:
  int4 with zero points. double_quant: NF4's scales as int8 (DoubleQuantized)."""
  if kind not in KINDS:
    raise ValueError(f"quantization kind {kind!r} is not one of {KINDS}")
  w = jnp.asarray(w)
  shape, b, i = w.shape, n_batch, n_in
  batch, ins, out = shape[:b], shape[b:b + i], shape[b + i:]
  k = math.prod(ins)
  group = group or k
  if k % group:
    raise ValueError(f"quantization group {group} does not divide the input size {k} of a "
                     f"weight of shape {shape}")
  if BITS[kind] == 4 and ins[-1] % 2:
    raise ValueError(f"{kind} packs two values a byte along the last input axis, of odd size "
                     f"{ins[-1]} in a weight of shape {shape}")
  if not symmetric and kind != "int4":
    raise ValueError(f"asymmetric quantization is for int4, not {kind}")
  g = k // group
  x = w.astype(jnp.float32).reshape(*batch, g, group, *out)
  reduce = b + 1  # the within-group axis
  zeros = None
  if kind == "nf4":
    s = jnp.max(jnp.abs(x), axis=reduce, keepdims=True)
    s = jnp.where(s > 0, s, 1.0)
    codes = jnp.argmin(jnp.abs((x / s)[..., None] - jnp.asarray(NF4)), axis=-1)
  elif symmetric:
    top = 2 ** (BITS[kind] - 1) - 1
    s = jnp.max(jnp.abs(x), axis=reduce, keepdims=True) / top
    s = jnp.where(s > 0, s, 1.0)
    codes = jnp.clip(jnp.round(x / s), -top, top)
  else:
    lo = jnp.minimum(jnp.min(x, axis=reduce, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(x, axis=reduce, keepdims=True), 0.0)
    s = (hi - lo) / 15.0
    s = jnp.where(s > 0, s, 1.0)
    z = jnp.clip(jnp.round(-lo / s), 0, 15)
    codes = jnp.clip(jnp.round(x / s) + z, 0, 15)
    zeros = z.reshape(*batch, g, *out)
  codes = codes.reshape(shape)
  if BITS[kind] == 8:
    values = codes.astype(jnp.int8)
  else:
    values = pack_int4(codes, axis=b + i - 1)
  scales = s.reshape(*batch, g, *out)
  if double_quant:
    scales = double_quantize(scales, n_batch=b)
  return Quantized(values, scales, zeros, kind=kind, group=group, n_in=i,
                   n_out=len(shape) - b - i, dtype=jnp.dtype(w.dtype))


# (n_in, n_out) of the block's matmul weights, by name (model/transformer.py layer_specs); any
# leading axes (stacked layers, an MoE's experts) are batch axes. Embedding, head, norms, biases
# and routers stay as they are (as AWQ and GPTQ leave them).
MATMUL_AXES = {"q": (1, 2), "k": (1, 2), "v": (1, 2), "o": (2, 1),
               "gate": (1, 1), "up": (1, 1), "down": (1, 1)}


def is_quantized(x) -> bool:
  return isinstance(x, Quantized)


def _name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def is_matmul(path) -> bool:
  """Whether the leaf at `path` (a tree_map_with_path path) is a block matmul weight."""
  in_layers = any(str(getattr(p, "key", p)).startswith("layers") for p in path)
  return in_layers and _name(path) in MATMUL_AXES


def quantize_params(params, kind: str, group: int = 0, *, symmetric: bool = True,
                    double_quant: bool = False, quantize_fn=None):
  """params with every layer's matmul weight (MATMUL_AXES) quantized; the rest unchanged.
  Boxed trees (nn.Partitioned leaves, as `Transformer.init` gives) keep each box, now around
  a Quantized: its logical names are the weight's (model/sharding.py `shardings_for`).

  quantize_fn(path, w, n_in, n_out) -> Quantized replaces round-to-nearest (GPTQ, AWQ)."""
  def one(path, w):
    if not is_matmul(path):
      return w
    if isinstance(w, nn.meta.AxisMetadata):
      return w.replace_boxed(one(path, w.unbox(apply_constraint=False)))
    n_in, n_out = MATMUL_AXES[_name(path)]
    if quantize_fn is not None:
      return quantize_fn(path, w, n_in, n_out)
    return quantize(w, kind, group, n_batch=w.ndim - n_in - n_out, n_in=n_in,
                    symmetric=symmetric, double_quant=double_quant)
  return jax.tree_util.tree_map_with_path(
      one, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def dequantize_params(params):
  """params with every Quantized weight dequantized to its own dtype: a plain tree."""
  return jax.tree.map(lambda x: x.astype(x.dtype) if is_quantized(x) else x, params,
                      is_leaf=is_quantized)


METHODS = ("rtn", "gptq", "awq")


@dataclasses.dataclass(frozen=True)
class Spec:
  """How a run directory's weights are quantized: its config.json "quant" entry, from which
  a loader rebuilds the tree's structure (`abstract`) before restoring it.

  kind: KINDS; group: input elements a scale covers (0: per output channel); symmetric
  (False: int4 with zero points); double_quant: NF4's scales as int8; method: how the codes
  were chosen (METHODS; the layout is the same for all, so loading ignores it)."""
  kind: str
  group: int = 0
  symmetric: bool = True
  double_quant: bool = False
  method: str = "rtn"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"quantization kind {self.kind!r} is not one of {KINDS}")
    if self.method not in METHODS:
      raise ValueError(f"quantization method {self.method!r} is not one of {METHODS}")
    if self.group < 0:
      raise ValueError(f"quantization group {self.group} must be >= 0 (0: per channel)")
    if not self.symmetric and self.kind != "int4":
      raise ValueError(f"asymmetric quantization is for int4, not {self.kind}")
    if self.double_quant and self.kind != "nf4":
      raise ValueError(f"double quantization is NF4's, not {self.kind}'s")

  @classmethod
  def from_dict(cls, entry: dict) -> "Spec":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(entry) - names)
    if unknown:
      raise ValueError(f"unknown quant keys {unknown}; valid keys: {sorted(names)}")
    return cls(**entry)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def quantize(self, params):
    """Round-to-nearest of params (plain or boxed, concrete or abstract), this layout."""
    return quantize_params(params, self.kind, self.group, symmetric=self.symmetric,
                           double_quant=self.double_quant)

  def check(self, params) -> None:
    """Raises ValueError naming the first weight of `params` (arrays or ShapeDtypeStructs)
    this layout cannot hold: a group that does not divide its input size, an odd packed axis."""
    def one(path, w):
      if not is_matmul(path) or is_quantized(w):
        return
      n_in, n_out = MATMUL_AXES[_name(path)]
      ins = w.shape[w.ndim - n_in - n_out:w.ndim - n_out]
      k, name = math.prod(ins), jax.tree_util.keystr(path, simple=True, separator="/")
      if self.group and k % self.group:
        raise ValueError(f"quantization group {self.group} does not divide the input size {k} "
                         f"of {name} (shape {tuple(w.shape)}); choose a group that divides it, "
                         f"e.g. {math.gcd(k, self.group)} (0: per output channel)")
      if BITS[self.kind] == 4 and ins[-1] % 2:
        raise ValueError(f"{self.kind} packs two values a byte along the last input axis, of "
                         f"odd size {ins[-1]} in {name} (shape {tuple(w.shape)})")
    jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)

  def abstract(self, abstract_params):
    """The quantized tree's ShapeDtypeStructs from the dense one's."""
    return jax.eval_shape(self.quantize, abstract_params)


def shardings(weight_shardings, params):
  """Shardings of a tree with Quantized leaves, from its weights' shardings (NamedSharding
  leaves, e.g. sharding.shardings_for of the unquantized model): values are split as the
  weight is (where the halved packed axis still divides), scales and zeros as the weight's
  batch and output axes with the group axis whole; double-quantized scales are replicated."""
  from jax.sharding import NamedSharding, PartitionSpec

  def one(named, x):
    if not is_quantized(x):
      return named
    spec = tuple(named.spec) + (None,) * (len(x.shape) - len(named.spec))
    mesh = named.mesh

    def fits(spec_, shape):
      out = []
      for axes, dim in zip(spec_, shape):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        out.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
      return NamedSharding(mesh, PartitionSpec(*out))

    b, i = x.n_batch, x.n_in
    grouped = spec[:b] + (None,) + spec[b + i:]  # [*batch, G, *out]
    if isinstance(x.scales, DoubleQuantized):
      replicated = NamedSharding(mesh, PartitionSpec())
      scales = DoubleQuantized(replicated, replicated, replicated)
    else:
      scales = fits(grouped, x.scales.shape)
    zeros = None if x.zeros is None else fits(grouped, x.zeros.shape)
    return x.replace(values=fits(spec, x.values.shape), scales=scales, zeros=zeros)

  return jax.tree.map(one, weight_shardings, params,
                      is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def matrix(q: Quantized) -> Quantized:
  """q as [*batch, K, N] (one input and one output axis): values, scales and zeros reshaped."""
  b = q.n_batch
  batch = q.values.shape[:b]
  flat = lambda a, n_in: a.reshape(*batch, math.prod(a.shape[b:b + n_in]), -1)
  scales = q.scales
  if not isinstance(scales, DoubleQuantized):
    scales = flat(scales, 1)
  else:
    scales = scales.replace(codes=flat(scales.codes, 1))
  return q.replace(values=flat(q.values, q.n_in), scales=scales,
                   zeros=None if q.zeros is None else flat(q.zeros, 1), n_in=1, n_out=1)


def concat_out(qs) -> Quantized:
  """Matrices [K, N_i] quantized alike, as one [K, sum N_i] (q, k and v fused)."""
  first = qs[0]
  if any((q.kind, q.group, q.zeros is None, isinstance(q.scales, DoubleQuantized))
         != (first.kind, first.group, first.zeros is None,
             isinstance(first.scales, DoubleQuantized)) for q in qs):
    raise ValueError("only weights quantized alike can be fused: "
                     f"{[(q.kind, q.group) for q in qs]}")
  cat = lambda arrays: jnp.concatenate(arrays, axis=-1)
  if isinstance(first.scales, DoubleQuantized):  # fused: plain scales again
    scales = cat([q.scale_array() for q in qs])
  else:
    scales = cat([q.scales for q in qs])
  return first.replace(values=cat([q.values for q in qs]), scales=scales,
                       zeros=None if first.zeros is None else cat([q.zeros for q in qs]))
