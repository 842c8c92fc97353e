"""Reading a run directory (README, "The run directory"): config.json, tokenizer.json, checkpoints/.

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
from model import ModelConfig, Transformer, quant, sharding

PARAMS = "params"  # the checkpoint item holding the parameter pytree
CONFIG = "config.json"
QUANT = "quant"  # config.json's entry of a quantized run (quant.Spec); absent in a dense one


def load_run_config(workdir: str) -> dict:
  path = as_path(workdir) / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a run directory?")
  return json.loads(path.read_text())


def load_model_config(workdir: str) -> ModelConfig:
  return ModelConfig.from_config(load_run_config(workdir)["model"])


def load_quant(workdir: str) -> quant.Spec | None:
  """How the run's weights are quantized (train/convert.py --quantize), None if they are not."""
  entry = load_run_config(workdir).get(QUANT)
  if entry is None:
    return None
  try:
    return quant.Spec.from_dict(entry)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{as_path(workdir) / CONFIG}: bad {QUANT!r} entry {entry!r}: {e}") from None


def load_tokenizer(workdir: str):
  path = as_path(workdir) / TOKENIZER
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  return read_tokenizer(path)


def load_tokenizer_config(workdir: str) -> dict:
  """tokenizer_config.json (chat template, special tokens), {} if the run has none."""
  return chat.load_tokenizer_config(workdir)


def abstract_params(cfg: ModelConfig, mesh=None, quantized: quant.Spec | None = None):
  """(abstract params, their shardings on `mesh`), allocating nothing; with `quantized`, the
  tree of quant.Quantized weights that layout gives (quant.shardings places them)."""
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1]) if mesh is None else mesh
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens))
  boxed = boxed["params"]
  abstract, shardings = nn.unbox(boxed), sharding.shardings_for(boxed, mesh)
  if quantized is None:
    return abstract, shardings
  abstract = quantized.abstract(abstract)
  return abstract, quant.shardings(shardings, abstract)


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
                shardings=None, *, dense: bool = False):
  """The parameters of a run's latest (or given) checkpoint, sharded onto `mesh` by the
  rules (default: the first device), or onto `shardings` (a pytree like the params).

  A quantized run (config.json's "quant", `load_quant`) loads as quant.Quantized weights, read
  as they are stored. Where `shardings` holds one NamedSharding for such a weight (the tree of
  a dense model, e.g. a trainable state's), or everywhere with `dense`, the weight is
  dequantized to its dtype on those shardings: training starts from it as from a dense run."""
  cfg = load_model_config(workdir) if cfg is None else cfg
  spec = load_quant(workdir)
  abstract, rule_shardings = abstract_params(cfg, mesh, spec)
  if shardings is None:
    shardings = rule_shardings
    if dense and spec is not None:
      shardings = abstract_params(cfg, mesh)[1]
  stored = shardings if spec is None else quant.shardings(shardings, abstract)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, stored)
  with checkpoint_reader(workdir) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {checkpoint_directory(workdir)}")
    args = ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)})
    params = manager.restore(step, args=args)[PARAMS]
  if spec is None:
    return params
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  wanted_dense = jax.tree.leaves(jax.tree.map(
      lambda s, x: is_sharding(s) and quant.is_quantized(x), shardings, abstract,
      is_leaf=is_sharding))
  if not any(wanted_dense):
    return params
  # Dequantized where `shardings` has a weight's single sharding; the rest as it is.
  dequantize = lambda tree: jax.tree.map(
      lambda s, x: x.astype(x.dtype) if is_sharding(s) and quant.is_quantized(x) else x,
      shardings, tree, is_leaf=is_sharding)
  return jax.jit(dequantize, out_shardings=shardings)(params)
