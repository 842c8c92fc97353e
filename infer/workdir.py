"""Reading a run directory (see ARCHITECTURE.md): config.json, tokenizer.json, checkpoints/.

Training writes it (train/checkpoint.py); everything that only needs a model reads it
through here: generation, evaluation, conversion. infer/ never imports train/, so the
reader lives on this side. A run directory may be local or remote (gs://bucket/run): files
are read through etils.epath, checkpoints through orbax's CheckpointManager.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from infer import chat
from infer.files import TOKENIZER, as_path, read_tokenizer
from model import ModelConfig, Transformer, sharding

PARAMS = "params"  # the checkpoint item holding the parameter pytree
CONFIG = "config.json"


def load_run_config(workdir: str) -> dict:
  path = as_path(workdir) / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a run directory?")
  return json.loads(path.read_text())


def load_model_config(workdir: str) -> ModelConfig:
  return ModelConfig.from_config(load_run_config(workdir)["model"])


def load_tokenizer(workdir: str):
  path = as_path(workdir) / TOKENIZER
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  return read_tokenizer(path)


def load_tokenizer_config(workdir: str) -> dict:
  """tokenizer_config.json (chat template, special tokens), {} if the run has none."""
  return chat.load_tokenizer_config(workdir)


def abstract_params(cfg: ModelConfig, mesh=None):
  """(abstract params, their shardings on `mesh`), allocating nothing."""
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1]) if mesh is None else mesh
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens))
  boxed = boxed["params"]
  return nn.unbox(boxed), sharding.shardings_for(boxed, mesh)


def checkpoint_directory(workdir: str):
  return as_path(workdir) / "checkpoints"


def checkpoint_reader(workdir: str) -> ocp.CheckpointManager:
  """A read-only CheckpointManager of a run: its steps (all_steps, latest_step), which items
  each step holds (item_metadata) and restoring them. Close it after use."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  return ocp.CheckpointManager(checkpoint_directory(workdir), options=options)


def latest_step(workdir: str) -> int:
  with checkpoint_reader(workdir) as manager:
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {checkpoint_directory(workdir)}")
  return step


def load_params(workdir: str, cfg: ModelConfig | None = None, mesh=None, step: int | None = None,
                shardings=None):
  """The parameters of a run's latest (or given) checkpoint, sharded onto `mesh` by the
  rules (default: the first device), or onto `shardings` (a pytree like the params)."""
  cfg = load_model_config(workdir) if cfg is None else cfg
  abstract, rule_shardings = abstract_params(cfg, mesh)
  shardings = rule_shardings if shardings is None else shardings
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)
  with checkpoint_reader(workdir) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {checkpoint_directory(workdir)}")
    args = ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})
    return manager.restore(step, args=args)[PARAMS]
