"""Orbax checkpoints of a run: sharded, async, restorable onto another mesh.

Each step directory holds three items:
  params    the model's parameter pytree (all that generation, evaluation and conversion need)
  train     step, optimizer state and RNG (present only in checkpoints written by training),
            and the trained pytree when it is not the model's (LoRA adapters, a PPO critic)
  data      the input iterator's state as JSON (likewise)
A converted model is a checkpoint with `params` alone; training starts from it with a fresh
optimizer (train.init_from), and resumes only from checkpoints that have all three.
Steps and the items a step holds come from orbax (its CheckpointManager), never from listing
directories, so `workdir` may be remote (gs://bucket/run).
"""

import logging
import sys

import jax
import orbax.checkpoint as ocp

from infer.workdir import PARAMS, checkpoint_directory

TRAIN, DATA = "train", "data"


def _abstract(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings: orbax restores each shard in place."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """The run's CheckpointManager, keeping the last `keep` steps under workdir/checkpoints."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = checkpoint_directory(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(PARAMS, TRAIN, DATA))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def items(self, step: int) -> set[str]:
    """The items checkpoint `step` holds (PARAMS, TRAIN, DATA), from orbax's metadata."""
    return set(self.manager.item_metadata(step).keys())

  def has_train_state(self, step: int) -> bool:
    return TRAIN in self.items(step)

  def save(self, state, data_state: dict | None = None, model_params=None) -> None:
    """Saves a TrainState (and the iterator state) at state.step. Async unless configured.
    `model_params`: the model's parameters when state.params is something else (see
    tasks.Objective.export); state.params then goes into the train item."""
    step = int(jax.device_get(state.step))
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    if model_params is not None:
      train["params"] = state.params
    items = {
        PARAMS: ocp.args.StandardSave(state.params if model_params is None else model_params),
        TRAIN: ocp.args.StandardSave(train),
    }
    if data_state is not None:
      items[DATA] = ocp.args.JsonSave(data_state)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_newest(self, abstract_state, shardings, *, separate_params: bool = False,
                     report=print):
    """(step, state, data_state) from the newest checkpoint with a train item that reads; or
    None. An unreadable one (a truncated file, say) is reported in one line naming the step
    and what failed, moved aside to `checkpoints/<step>.unreadable` (nothing is deleted, and
    orbax no longer counts it), and the next older one is tried."""
    _silence_aborted_reads()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        if not self.has_train_state(step):
          return None  # a converted model (params alone): training starts from it afresh
        state, data_state = self.restore(step, abstract_state, shardings,
                                         separate_params=separate_params)
        return step, state, data_state
      except Exception as e:  # noqa: BLE001  (orbax/TensorStore raise many kinds)
        aside = self.directory / f"{step}.unreadable"
        report(f"checkpoint step {step} cannot be read ({_first_cause(e)}); moved it to "
               f"{aside} and trying the step before")
        if jax.process_index() == 0:
          (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
          from jax.experimental import multihost_utils
          multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
    return None

  def save_params(self, step: int, params) -> None:
    self.manager.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params)}),
                      force=True)

  def restore(self, step: int, abstract_state, shardings, *, separate_params: bool = False):
    """(TrainState without frozen arrays, data_state or None) restored onto `shardings` (any
    mesh). `separate_params`: state.params lives in the train item (see save)."""
    names = ("step", "opt_state", "rng") + (("params",) if separate_params else ())
    abstract_train = {k: getattr(abstract_state, k) for k in names}
    train_shardings = {k: getattr(shardings, k) for k in names}
    items = {TRAIN: ocp.args.StandardRestore(_abstract(abstract_train, train_shardings))}
    if not separate_params:
      items[PARAMS] = ocp.args.StandardRestore(_abstract(abstract_state.params,
                                                         shardings.params))
    has_data = DATA in self.items(step)
    if has_data:
      items[DATA] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    train = out[TRAIN]
    state = abstract_state.replace(
        step=train["step"], params=train["params"] if separate_params else out[PARAMS],
        opt_state=train["opt_state"], rng=train["rng"], frozen=None)
    return state, (out[DATA] if has_data else None)

  def restore_params(self, step: int, abstract_params, param_shardings):
    out = self.manager.restore(step, args=ocp.args.Composite(
        **{PARAMS: ocp.args.StandardRestore(_abstract(abstract_params, param_shardings))}))
    return out[PARAMS]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _is_aborted_read(error) -> bool:
  return ((isinstance(error, RuntimeError) and str(error) == "Event loop is closed")
          or "error while reading array index" in str(error))


class _DropAbortedReads(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and _is_aborted_read(record.exc_info[1]))


def _silence_aborted_reads() -> None:
  """When a restore fails, orbax closes its event loop with its other reads still in flight,
  and they report later, from other threads and as late as interpreter exit, each with a page
  of traceback and TensorStore spec: asyncio logs the failed ones ("Task exception was never
  retrieved"), Python reports their coroutines ("Exception ignored in"), and TensorStore
  prints "Event loop is closed" for each that finishes. restore_newest has already said in
  one line what failed: from here on these three are dropped, and nothing else is."""
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropAbortedReads) for f in logger.filters):
    logger.addFilter(_DropAbortedReads())
  if getattr(sys.excepthook, "drops_aborted_reads", False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def drop_excepthook(kind, value, tb):
    if not _is_aborted_read(value):
      excepthook(kind, value, tb)

  def drop_unraisablehook(unraisable):
    if not _is_aborted_read(unraisable.exc_value):
      unraisablehook(unraisable)

  drop_excepthook.drops_aborted_reads = True
  sys.excepthook, sys.unraisablehook = drop_excepthook, drop_unraisablehook


def _first_cause(e: BaseException) -> str:
  """The root of an exception chain in one line (TensorStore names the file and the array;
  orbax wraps it in a page of spec)."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return line if len(line) <= 400 else line[:400] + "..."
