"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as pure
functions on parameter trees.

A targeted weight W (in dims I..., out dims O...) is adapted as W' = W + (alpha / rank) A @ B,
A: [I..., r], B: [r, O...] (Hu et al. 2021, Sec. 4.1: B starts at zero, so W' = W at init).

The adapters are a pytree of their own, nested like the parameters but holding only the
targeted projections:
  {"layers": {"attn": {"q": {"a": [L, D, r], "b": [L, r, N, H]}, ...}, "mlp": {...}}}
(scanned layers keep their leading L axis; unrolled ones live under "layers_0", ...).

Training runs the model on `attach(params, adapters, ...)`: each adapted weight becomes an
`Adapted` leaf that the block applies unmerged, x W + s (x A) B (model/layers.py `project`),
never forming W + A B. So the step holds only the [B, T, r] activations of the adapters, the
base W gets no gradient (it stays frozen, with no optimizer state, and may be quantized: QLoRA
on a model/quant.py base), and the FLOPs are the base's forward plus the adapters'. Export,
and decoding (rollouts, samples), take `merge(params, adapters, ...)`: ordinary weights.

Dimensions are kept as the weights have them (A: [*lead, in dims..., r], B: [*lead, r,
out dims...]) so that boxed adapters can inherit the weights' logical axis names and be
sharded by the same rules table (model/sharding.py) as the weights they adapt.
"""

import math
import string
from typing import Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# (module, projection) -> (number of input dims, number of output dims), as in model/layers.py:
# attn q [D, N, H], k/v [D, K, H], o [N, H, D]; mlp gate/up [D, F], down [F, D].
_PROJECTIONS = {
    "q": ("attn", 1, 2), "k": ("attn", 1, 2), "v": ("attn", 1, 2), "o": ("attn", 2, 1),
    "gate": ("mlp", 1, 1), "up": ("mlp", 1, 1), "down": ("mlp", 1, 1),
}
TARGETS = tuple(_PROJECTIONS)


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """("q", "v") or "q,v" -> ("q", "v"); unknown names are an error that lists the valid ones."""
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(",") if t.strip()]
  targets = tuple(dict.fromkeys(targets))  # dedupe, keep order
  unknown = [t for t in targets if t not in _PROJECTIONS]
  if unknown or not targets:
    raise ValueError(f"unknown LoRA targets {unknown or list(targets)}; valid targets: "
                     f"{', '.join(TARGETS)}")
  return targets


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _targeted(path: tuple[str, ...], targets) -> bool:
  return len(path) >= 2 and path[-1] in targets and path[-2] == _PROJECTIONS[path[-1]][0]


def _split_dims(path, ndim: int):
  """(lead, in, out) dim counts of the weight at `path` with `ndim` dims."""
  _, n_in, n_out = _PROJECTIONS[path[-1]]
  lead = ndim - n_in - n_out
  if lead < 0:
    raise ValueError(f"{'/'.join(path)} has {ndim} dims; a LoRA target {path[-1]!r} needs at "
                     f"least {n_in + n_out} ({n_in} in, {n_out} out)")
  return lead, n_in, n_out


def _walk(tree, path=()):
  """(path, leaf) pairs of a nested mapping, keys sorted (a deterministic rng order)."""
  if isinstance(tree, Mapping):
    for key in sorted(tree):
      yield from _walk(tree[key], path + (key,))
  else:
    yield path, tree


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def init_adapters(params, *, targets: str | Sequence[str] = TARGETS, rank: int, rng,
                  dtype=jnp.float32) -> dict:
  """Adapters for every targeted projection of `params`.

  params: the model's parameter tree, plain or boxed (nn.Partitioned with logical names,
    e.g. from `jax.eval_shape` of `Transformer.init`); only shapes are read, so abstract
    values (ShapeDtypeStruct) are fine.
  Returns {..., "<proj>": {"a": [*lead, in dims..., r], "b": [*lead, r, out dims...]}}, in
  `dtype` (f32: the adapters are the trained weights). A is uniform in +-1/sqrt(fan_in), as
  peft's kaiming_uniform_(a=sqrt(5)), so x @ A keeps x's scale whatever the width; B = 0.
  Boxed params give boxed adapters: A takes the weight's lead and in-dim names plus None for
  the rank, B the lead names, None, then the out-dim names (so "layers" stays on the lead
  axis and `sharding.shardings_for` shards adapters like their weights).
  """
  targets = parse_targets(targets)
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  out, index = {}, 0
  for path, leaf in _walk(params):
    if not _targeted(path, targets):
      continue
    value = leaf.unbox() if _is_box(leaf) else leaf
    lead, n_in, _ = _split_dims(path, len(value.shape))
    shape = tuple(value.shape)
    a_shape = shape[:lead + n_in] + (rank,)
    b_shape = shape[:lead] + (rank,) + shape[lead + n_in:]
    fan_in = math.prod(shape[lead:lead + n_in])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, index), a_shape, dtype, -bound, bound)
    b = jnp.zeros(b_shape, dtype)
    index += 1
    if _is_box(leaf):
      names = tuple(leaf.names)
      a = leaf.replace(value=a, names=names[:lead + n_in] + (None,))
      b = leaf.replace(value=b, names=names[:lead] + (None,) + names[lead + n_in:])
    _set(out, path, {"a": a, "b": b})
  if not out:
    found = sorted({p[-1] for p, _ in _walk(params)})
    raise ValueError(f"no parameter matches LoRA targets {list(targets)} (expected attn/<q,k,v,o>"
                     f" or mlp/<gate,up,down>); parameter names found: {found}")
  return out


def delta(a, b, *, n_in: int, rank: int, alpha: float) -> jax.Array:
  """(alpha / rank) A @ B in f32, contracting the rank:
  a [*lead, I..., r] (n_in input dims), b [*lead, r, O...] -> [*lead, I..., O...]."""
  lead = a.ndim - 1 - n_in
  if a.shape[-1] != rank or b.ndim <= lead or b.shape[:lead + 1] != a.shape[:lead] + (rank,):
    raise ValueError(f"LoRA rank={rank} does not match adapter shapes a{tuple(a.shape)}, "
                     f"b{tuple(b.shape)}: expected a [*lead, in..., {rank}], "
                     f"b [*lead, {rank}, out...]")
  letters = iter(string.ascii_lowercase)
  take = lambda k: "".join(next(letters) for _ in range(k))
  lead_s, in_s, out_s, r = take(lead), take(n_in), take(b.ndim - lead - 1), take(1)
  ab = jnp.einsum(f"{lead_s}{in_s}{r},{lead_s}{r}{out_s}->{lead_s}{in_s}{out_s}",
                  a.astype(jnp.float32), b.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return (alpha / rank) * ab


@flax.struct.dataclass
class Adapted:
  """A frozen weight (an array or a model/quant.py Quantized) with its LoRA adapter, applied
  unmerged. a [..., I..., r], b [..., r, O...] as stored in the adapters."""
  base: object
  a: jax.Array
  b: jax.Array
  scale: float = flax.struct.field(pytree_node=False)  # alpha / rank
  n_in: int = flax.struct.field(pytree_node=False)

  def project(self, equation: str, x, dtype):
    """jnp.einsum(equation, x, W' in dtype) for W' = W + scale A B, without forming W':
    x W + scale (x A) B. equation: "<x>,<in dims><out dims>-><y>" (e.g. "BTD,DNH->BTNH")."""
    inputs, y = equation.split("->")
    x_dims, w_dims = inputs.split(",")
    w_in, w_out = w_dims[:self.n_in], w_dims[self.n_in:]
    xa = "".join(c for c in x_dims if c not in w_in) + "r"  # [..., r]
    low = jnp.einsum(f"{x_dims},{w_in}r->{xa}", x, self.a.astype(dtype))
    update = jnp.einsum(f"{xa},r{w_out}->{y}", low, self.b.astype(dtype))
    return jnp.einsum(equation, x, self.base.astype(dtype)) + self.scale * update


def _lookup(params, path):
  node = params
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"adapter {'/'.join(path)} has no weight in params")
    node = node[key]
  return node


def attach(params, adapters, *, rank: int, alpha: float):
  """params with each adapted weight W replaced by Adapted(W, A, B): the tree training runs
  (the module docstring). Plain (unboxed) params and adapters."""
  adapters = nn.unbox(adapters)
  out = dict(params)
  for path, pair in pairs(adapters):
    w = _lookup(params, path)
    _, n_in, _ = _split_dims(path, w.ndim)
    delta_shape = pair["a"].shape[:-1] + pair["b"].shape[pair["a"].ndim - n_in:]
    if pair["a"].shape[-1] != rank or delta_shape != tuple(w.shape):
      raise ValueError(f"adapter {'/'.join(path)} (a{tuple(pair['a'].shape)}, "
                       f"b{tuple(pair['b'].shape)}, rank {rank}) does not fit a weight of "
                       f"shape {tuple(w.shape)}")
    _replace(out, path, Adapted(w, pair["a"], pair["b"], scale=alpha / rank, n_in=n_in))
  return out


def merge(params, adapters, *, rank: int, alpha: float):
  """params with each adapted W replaced by W + (alpha / rank) A @ B, in W's dtype.

  Pure and jit-able; differentiable w.r.t. `adapters` (and `params`, though LoRA trains only
  the adapters). Leaves without an adapter are passed through as the same objects. Plain or
  boxed params and adapters; boxed weights keep their box (names) around the merged value.
  """
  adapters = nn.unbox(adapters)
  merged = dict(params)
  for path, pair in pairs(adapters):
    node = _lookup(params, path)
    w = node.unbox() if _is_box(node) else node
    _, n_in, _ = _split_dims(path, w.ndim)
    d = delta(pair["a"], pair["b"], n_in=n_in, rank=rank, alpha=alpha)
    if d.shape != w.shape:
      raise ValueError(f"adapter {'/'.join(path)} gives an update of shape {d.shape} for a "
                       f"weight of shape {w.shape}")
    new = (w.astype(jnp.float32) + d).astype(w.dtype)
    _replace(merged, path, node.replace_boxed(new) if _is_box(node) else new)
  return merged


def pairs(adapters, path=()):
  """Yields (path, {"a": A, "b": B}) per adapted weight; path names the weight, e.g.
  ("layers", "attn", "q"); A and B as stored (boxed or not)."""
  if isinstance(adapters, Mapping) and set(adapters) == {"a", "b"}:
    yield path, adapters
  elif isinstance(adapters, Mapping):
    for key in sorted(adapters):
      yield from pairs(adapters[key], path + (key,))
  else:
    raise ValueError(f"adapters/{'/'.join(path)} is a leaf; expected {{'a': ..., 'b': ...}}")


def _replace(tree: dict, path, value):
  """Sets tree[path] = value, copying only the dicts along the path (the rest is shared)."""
  for key in path[:-1]:
    tree[key] = dict(tree[key])
    tree = tree[key]
  tree[path[-1]] = value


def count(adapters) -> int:
  """Number of trainable adapter parameters."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(adapters)))
