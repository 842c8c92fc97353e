"""The train state, created already sharded.

nanodo's recipe: `jax.eval_shape(init)` gives the abstract state with logical axis names,
the rules turn those into NamedShardings, and `jax.jit(init, out_shardings=...)` builds each
shard on its own device, so no host ever holds the whole model.
"""

from typing import Any

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
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2]: raw key data, so it checkpoints like any array


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  def init(seed):
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    boxed = model.init(init_rng, tokens, tokens)["params"]
    # optax maps over the boxes, so mu and nu inherit the parameters' logical names.
    return TrainState(step=jnp.zeros((), jnp.int32), params=boxed, opt_state=tx.init(boxed),
                      rng=state_rng)
  return init


def abstract_state(model, tx, mesh: Mesh, seq_len: int):
  """(abstract unboxed state, its NamedShardings), with nothing allocated."""
  init = _init_fn(model, tx, seq_len)
  boxed = jax.eval_shape(init, 0)
  shardings = sharding.shardings_for(boxed, mesh)
  return nn.unbox(boxed), shardings


def create_state(model, tx, mesh: Mesh, seed: int, seq_len: int):
  """Returns (state, shardings) with every array created on its own shards."""
  init = _init_fn(model, tx, seq_len)
  _, shardings = abstract_state(model, tx, mesh, seq_len)
  state = jax.jit(lambda s: nn.unbox(init(s)), static_argnums=0, out_shardings=shardings)(seed)
  return state, shardings


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
