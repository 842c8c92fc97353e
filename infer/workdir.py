"""Reading a run directory (see ARCHITECTURE.md): config.json, tokenizer.json, checkpoints/.

Training writes it (train/checkpoint.py); everything that only needs a model reads it
through here: generation, evaluation, conversion. infer/ never imports train/, so the
reader lives on this side.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from model import ModelConfig, Transformer, sharding

PARAMS = "params"  # the checkpoint item holding the parameter pytree


def load_run_config(workdir: str) -> dict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a run directory?")
  with open(path) as f:
    return json.load(f)


def load_model_config(workdir: str) -> ModelConfig:
  return ModelConfig.from_config(load_run_config(workdir)["model"])


def load_tokenizer(workdir: str):
  from tokenizers import Tokenizer
  path = os.path.join(workdir, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found")
  return Tokenizer.from_file(path)


def abstract_params(cfg: ModelConfig, mesh=None):
  """(abstract params, their shardings on `mesh`), allocating nothing."""
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1]) if mesh is None else mesh
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens))
  boxed = boxed["params"]
  return nn.unbox(boxed), sharding.shardings_for(boxed, mesh)


def latest_step(workdir: str) -> int:
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {directory}")
  return max(steps)


def load_params(workdir: str, cfg: ModelConfig | None = None, mesh=None, step: int | None = None,
                shardings=None):
  """The parameters of a run's latest (or given) checkpoint, sharded onto `mesh` by the
  rules (default: the first device), or onto `shardings` (a pytree like the params)."""
  cfg = load_model_config(workdir) if cfg is None else cfg
  step = latest_step(workdir) if step is None else step
  abstract, rule_shardings = abstract_params(cfg, mesh)
  shardings = rule_shardings if shardings is None else shardings
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), PARAMS)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)
