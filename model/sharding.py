"""All sharding in one place: the mesh, and one table mapping logical axis names to mesh axes.

Model code names axes logically ("embed", "heads", "batch", ...). Changing the parallelism
means changing this table or the mesh shape in the config, never the model.
"""

import contextlib
import contextvars
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Everything but the experts treats the expert axis as one more data-parallel axis (as
# MaxText and DeepSpeed-MoE do): the batch is split over all three.
BATCH_AXES = ("data", "fsdp", "expert")

# logical name -> mesh axis (or axes, or None for replicated).
RULES = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # The expert dim of MoE weights: each device of the expert axis holds E / mesh.expert
    # experts (model/moe.py runs them per shard).
    ("expert", "expert"),
)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int,
               expert: int = 1) -> tuple[int, int, int, int]:
  """(data, fsdp, expert, tensor), one -1 entry resolved to fill the devices; errors name
  the config keys."""
  sizes = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.expert": expert, "mesh.tensor": tensor}
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"only one of {sorted(sizes)} may be -1, got {sizes}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"mesh sizes must be positive or -1, got {sizes}")
  if fill:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot be split by {sizes}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes.values())


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, *, expert: int = 1) -> Mesh:
  """The (data, fsdp, expert, tensor) mesh over `devices` (default: all of the job's).

  (`expert` is keyword-only: every mesh without expert parallelism is the 3-number call.)
  Several TPU slices (multi-slice, joined by the data-centre network) split the data axis
  between them: only gradient reductions cross the slow links; fsdp, expert and tensor stay
  on each slice's fast interconnect (the expert all-gathers and reduce-scatters among them).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices), expert)
  # Auto axes: the classic GSPMD style, where jit in/out shardings drive propagation.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  if shape[0] % slices:
    raise ValueError(f"{slices} TPU slices split the data axis: mesh.data={shape[0]} must be "
                     f"a multiple of {slices}")
  from jax.experimental import mesh_utils
  grid = mesh_utils.create_hybrid_device_mesh(
      (shape[0] // slices, *shape[1:]), (slices, 1, 1, 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> PartitionSpec:
  """Maps logical names to mesh axes, replicating a dimension its mesh axes don't divide.

  (3 kv heads cannot be split 4 ways: they are replicated over "tensor" instead of failing.)
  """
  mesh_spec = nn.logical_to_mesh_axes(logical, rules)
  out = []
  for dim, axes in zip(shape, tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in names if mesh.shape[a] > 1)
    if kept and dim % math.prod(mesh.shape[a] for a in kept):
      kept = ()
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def shardings_for(abstract_boxed, mesh: Mesh, rules=RULES):
  """NamedShardings for a pytree of (abstract) values boxed with logical partitioning. A box
  around a model/quant.py Quantized (its weight's names) gives the Quantized's shardings,
  derived from the weight's (`quant.shardings`)."""
  from model import quant  # deferred: quant imports the kernels
  logical = nn.get_partition_spec(abstract_boxed)
  shapes = nn.unbox(abstract_boxed)

  def one(spec, x):
    if not jax.tree.leaves(x):  # an empty placeholder (optax.MaskedNode: a leaf Muon skips)
      return x
    named = NamedSharding(mesh, logical_to_spec(spec, x.shape, mesh, rules))
    return quant.shardings(named, x) if quant.is_quantized(x) else named

  return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, T] batch: rows over the data, fsdp and expert axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def host_local_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Rows this process feeds. Each host feeds only its shard of the global batch."""
  del mesh
  if global_batch % jax.process_count():
    raise ValueError(f"train.batch_size={global_batch} is not divisible by "
                     f"{jax.process_count()} processes")
  return global_batch // jax.process_count()


def num_batch_shards(mesh: Mesh) -> int:
  """Devices a batch's rows are split over: mesh.data x mesh.fsdp x mesh.expert."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


# The mesh that activation constraints refer to while a step is traced (None: no constraints,
# e.g. a plain `model.apply` in a notebook).
_ACTIVATION_MESH = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=RULES):
  """Within this block, `constrain` pins activations to `mesh` by the rules table. Wrap the
  body of a function that jit traces (not the call site: tracing happens at the first call)."""
  token = _ACTIVATION_MESH.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def current_mesh() -> Mesh | None:
  """The mesh of the enclosing `activation_sharding` block, if any."""
  ctx = _ACTIVATION_MESH.get()
  return None if ctx is None else ctx[0]


def activation_spec(logical_axes: tuple, shape: Sequence[int]) -> PartitionSpec | None:
  """The mesh spec of an activation of `shape` named `logical_axes` by the rules of the
  enclosing `activation_sharding` block; None outside one."""
  ctx = _ACTIVATION_MESH.get()
  if ctx is None:
    return None
  mesh, rules = ctx
  return logical_to_spec(PartitionSpec(*logical_axes), shape, mesh, rules)


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside `activation_sharding`."""
  spec = activation_spec(logical_axes, x.shape)
  if spec is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(current_mesh(), spec))


def in_mesh(fn, mesh: Mesh, rules=RULES):
  """fn traced with activation constraints on `mesh`."""
  def wrapped(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)
  return wrapped
