"""Training tasks: pretraining, SFT, reward modelling, DPO, PPO and GRPO on one loop.

A task is a module with two functions, and train/loop.py owns everything else (mesh, sharded
state, accumulation, evaluation schedule, checkpoints, metrics):
  objective(cfg, model_cfg) -> Objective   all the jitted step needs: what is trained and
                                           how it starts, the loss, the frozen arrays' shapes
  feed(cfg, model_cfg, mesh, run) -> Feed  the data side, once tokenizer and files are known
"""

import dataclasses
import importlib
from typing import Any, Callable, Iterator

from train.config import ConfigError

NAMES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")


@dataclasses.dataclass(frozen=True)
class Objective:
  # rng -> the trainable pytree, boxed with logical axis names (shapes, shardings and the
  # starting values of anything not loaded from train.init_from).
  init: Callable
  # (params, frozen, batch) -> (total, sums incl. "count"); see train/step.py.
  loss_fn: Callable
  # (batch_size, seq_len) -> {name: (shape, dtype)} of one train batch (dry runs).
  batch_shapes: Callable
  # rng -> the frozen pytree, boxed; only its shapes and names are used (for shardings).
  init_frozen: Callable | None = None
  # (params, frozen) -> the model's parameter tree, when `params` is not already it (LoRA
  # adapters, a policy with its critic). Checkpoints store this as their `params` item, so a
  # run directory always serves generation and conversion as it is.
  export: Callable | None = None
  # (fresh params, frozen) -> the params training starts from (train.init_from, a critic
  # initialised from a reward model); None keeps the fresh ones.
  start: Callable | None = None
  # (batch_size, seq_len) -> metrics.StepCost: the tokens and model FLOPs of one train step,
  # for tokens/s and MFU; None: the model forward and backward over the batch's rows.
  step_cost: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Run:
  """What a task's feed gets from the loop."""
  workdir: str
  tokenizer: Any  # tokenizers.Tokenizer
  tokenizer_config: dict  # chat template and special tokens ({} for our own BPE)
  train_files: list
  val_files: list


@dataclasses.dataclass
class Feed:
  # Train batches: dicts of host arrays of the global batch, with get_state(), set_state()
  # and close() (the state goes into every checkpoint).
  train: Iterator
  # () -> a fresh iterator over validation batches; the loop averages the loss sums.
  val: Callable[[], Iterator] | None = None
  # (params, frozen) -> extra {"val_...": float} (e.g. the score of greedy answers).
  evaluate: Callable | None = None
  # (frozen shardings) -> the frozen pytree placed on them.
  load_frozen: Callable | None = None
  # Host-side metrics of the latest batch (rollout scores, KL), merged into the log.
  host_metrics: Callable[[], dict] = dict
  # () -> seconds the train iterator spent, since the last call, on work that is not the
  # train step (PPO/GRPO rollouts): taken off the train step's tokens/s and MFU.
  off_clock: Callable[[], float] = float
  # text -> (prompt ids, eos ids) for the sample printed after training; None: no sample.
  sample_prompt: Callable | None = None
  # files -> one ordered pass over their batches (post-training data).
  make: Callable | None = None


def module(name: str):
  """The module implementing task `name`."""
  if name not in NAMES:
    raise ConfigError(f"task={name!r} is not one of {list(NAMES)}")
  return importlib.import_module(f"train.tasks.{name}")
