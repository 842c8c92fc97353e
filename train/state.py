"""The train state, created already sharded.

nanodo's recipe: `jax.eval_shape(init)` gives the abstract state with logical axis names,
the rules turn those into NamedShardings, and `jax.jit(init, out_shardings=...)` builds each
shard on its own device, so no host ever holds the whole model.
"""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from model import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Any  # what gets gradients: the model, adapters, or policy and critic (see tasks/)
  opt_state: Any
  rng: jax.Array  # uint32[2]: raw key data, so it checkpoints like any array
  # Arrays the loss reads but never updates (a DPO reference, LoRA's base weights, a reward
  # model). Passed through the jitted step unchanged, so donation aliases them in place; never
  # checkpointed: they are loaded again from their source run.
  frozen: Any = None


# init_params(rng) -> the trainable pytree, boxed with logical axis names (nn.Partitioned).
InitFn = Callable[[jax.Array], Any]


def _init_fn(init_params: InitFn, tx: optax.GradientTransformation):
  def init(seed):
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    boxed = init_params(init_rng)
    # optax maps over the boxes, so mu and nu inherit the parameters' logical names.
    return TrainState(step=jnp.zeros((), jnp.int32), params=boxed, opt_state=tx.init(boxed),
                      rng=state_rng)
  return init


def abstract_state(init_params: InitFn, tx, mesh: Mesh, init_frozen: InitFn | None = None):
  """(abstract unboxed state, its NamedShardings), with nothing allocated. `init_frozen`
  gives the frozen tree's shapes and logical names (never its values)."""
  boxed = jax.eval_shape(_init_fn(init_params, tx), 0)
  if init_frozen is not None:
    boxed = boxed.replace(frozen=jax.eval_shape(init_frozen, jax.random.PRNGKey(0)))
  return nn.unbox(boxed), sharding.shardings_for(boxed, mesh)


def create_state(init_params: InitFn, tx, mesh: Mesh, seed: int, shardings, frozen=None):
  """The state with every trainable array created on its own shards; `frozen` (already
  placed, e.g. loaded from a run) is attached as it is."""
  init = _init_fn(init_params, tx)
  trainable = shardings.replace(frozen=None)
  state = jax.jit(lambda s: nn.unbox(init(s)), static_argnums=0, out_shardings=trainable)(seed)
  return state.replace(frozen=frozen)


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
