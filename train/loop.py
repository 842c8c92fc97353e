"""The training loop: one function that runs any task on any mesh.

It builds the mesh, data, model, optimizer and sharded state; resumes from the workdir if a
checkpoint is there; runs the jitted step, evaluating, logging and checkpointing on schedule;
and on SIGTERM/SIGINT finishes the current step, saves, and returns (train/preemption.py).
The workdir may be remote (gs://bucket/run): it is reached through etils.epath and orbax.
"""

import dataclasses
import json
import logging
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infer import files
from infer import workdir as run_dir
from infer.decode import generate
from infer.sampling import SamplingParams
from model import ModelConfig, sharding
from train import data as data_lib
from train import metrics as metrics_lib
from train import optim, preemption, step as step_lib
from train import streams
from train.checkpoint import Checkpointer
from train.config import ConfigError, flatten
from train.profiler import StepWindow
from train.progress import Progress
from train import tasks
from train.state import TrainState, abstract_state, create_state, param_count
from train.tokenizer import load_or_train_tokenizer


def model_and_mesh(cfg, devices=None):
  """(ModelConfig, mesh over `devices`, default all) from a run config; their errors become
  ConfigErrors (clean messages naming the key, no traceback)."""
  try:
    model_cfg = ModelConfig.from_config(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices,
                              expert=cfg.mesh.expert)
    optim.make_optimizer(cfg.train)  # train.decay, train.optimizer
  except ValueError as e:
    raise ConfigError(str(e)) from None
  validate(cfg, model_cfg, mesh)
  return model_cfg, mesh


def validate(cfg, model_cfg: ModelConfig, mesh) -> None:
  """Config errors that would otherwise surface as shape errors deep inside jit."""
  t = cfg.train
  if cfg.data.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len="
                      f"{model_cfg.max_seq_len}: the model cannot take sequences that long")
  if cfg.data.seq_len < 2:
    raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be at least 2")
  if t.microbatches < 1 or t.batch_size % t.microbatches:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                      f"train.microbatches={t.microbatches}")
  if t.on_nonfinite not in ("stop", "skip"):
    raise ConfigError(f"train.on_nonfinite={t.on_nonfinite!r} is not one of stop, skip")
  if t.warmup_steps >= t.steps:
    logging.getLogger(__name__).warning(
        f"train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}: the learning "
        f"rate never reaches train.lr={t.lr}")
  shards = sharding.num_batch_shards(mesh)
  if (t.batch_size // t.microbatches) % shards:
    raise ConfigError(f"a microbatch of {t.batch_size // t.microbatches} rows cannot be split "
                      f"over mesh.data x mesh.fsdp x mesh.expert = {shards} devices: make "
                      f"train.batch_size / train.microbatches a multiple of {shards}")
  experts, ep = model_cfg.n_experts, mesh.shape["expert"]
  if ep > 1 and experts and experts % ep:
    raise ConfigError(f"model.n_experts={experts} cannot be split over mesh.expert={ep} "
                      f"devices: make mesh.expert a divisor of model.n_experts")
  if t.batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                      f"{jax.process_count()} processes")
  if cfg.checkpoint.preemption_check_every < 1:
    raise ConfigError(f"checkpoint.preemption_check_every="
                      f"{cfg.checkpoint.preemption_check_every} must be at least 1")
  tasks.module(cfg.task)  # names the valid tasks if it is not one
  if cfg.task == "pretrain" and cfg.lora.rank:
    raise ConfigError(f"lora.rank={cfg.lora.rank} adapts a model in post-training: "
                      "task='pretrain' trains every weight (set task, e.g. sft)")


@dataclasses.dataclass(frozen=True)
class Program:
  """What a run compiles: the task's objective, the optimizer, the abstract state with its
  shardings, and the jitted steps."""
  objective: tasks.Objective
  tx: Any
  mesh: Any
  abstract: Any
  shardings: Any
  batch_sharding: Any
  train_step: Callable  # (state, batch) -> (state, metrics)
  eval_step: Callable  # (params, frozen, batch) -> metric sums

  def init_state(self, seed: int, frozen=None) -> TrainState:
    return create_state(self.objective.init, self.tx, self.mesh, seed, self.shardings, frozen)


def step_cost(objective: tasks.Objective, model_cfg: ModelConfig, batch_size: int,
              seq_len: int) -> metrics_lib.StepCost:
  """Tokens and model FLOPs of one train step: the task's count, else the model forward and
  backward over the batch's rows."""
  if objective.step_cost is not None:
    return objective.step_cost(batch_size, seq_len)
  return metrics_lib.StepCost.of(seq_len, trained=[(model_cfg, batch_size)])


def build_program(cfg, model_cfg: ModelConfig, mesh) -> Program:
  objective = tasks.module(cfg.task).objective(cfg, model_cfg)
  tx = optim.make_optimizer(cfg.train)
  abstract, shardings = abstract_state(objective.init, tx, mesh, objective.init_frozen)
  train_step = step_lib.make_train_step(
      objective.loss_fn, tx, microbatches=cfg.train.microbatches, mesh=mesh,
      param_shardings=shardings.params, schedule=optim.learning_rate_schedule(cfg.train))
  batch_sh = sharding.batch_sharding(mesh)
  p_train_step = jax.jit(sharding.in_mesh(train_step, mesh), in_shardings=(shardings, batch_sh),
                         out_shardings=(shardings, sharding.replicated(mesh)),
                         donate_argnums=0)
  p_eval_step = jax.jit(sharding.in_mesh(step_lib.make_eval_step(objective.loss_fn), mesh),
                        in_shardings=(shardings.params, shardings.frozen, batch_sh))
  return Program(objective, tx, mesh, abstract, shardings, batch_sh, p_train_step, p_eval_step)


class _HostBatches:
  """Feeds this host's rows of every global batch to its devices.

  The data feeds give each host only its own block of rows: each host builds only the data
  streams of its rows (train/streams.py), so the global batch, and hence the losses, are the
  same for any number of processes. Where every host computes the whole batch instead (RL
  rollouts), the host keeps its rows of it. A finite pass (`finite`, evaluation) ends on all
  hosts together: a host whose rows have run out feeds padding until every host's have.
  """

  def __init__(self, iterator, mesh, global_batch: int, *, finite: bool = False):
    self.iterator, self.finite = iterator, finite
    self.sharding = sharding.batch_sharding(mesh)
    self.global_batch = global_batch
    self.per_host = global_batch // jax.process_count()
    start = jax.process_index() * self.per_host
    self.rows = slice(start, start + self.per_host)
    self.last = None

  def __next__(self):
    batch = self._local()
    return {k: jax.make_array_from_process_local_data(self.sharding, v)
            for k, v in batch.items()}

  def _local(self) -> dict:
    if not self.finite or jax.process_count() == 1:
      return self._own_rows(next(self.iterator))
    try:
      batch, real = self._own_rows(next(self.iterator)), True
    except StopIteration:
      batch, real = self._padding(), False
    if not preemption.any_process(real):
      raise StopIteration
    return batch

  def _own_rows(self, batch) -> dict:
    rows = len(next(iter(batch.values())))
    if rows == self.global_batch and rows != self.per_host:
      batch = {k: np.asarray(v)[self.rows] for k, v in batch.items()}
    elif rows != self.per_host:
      raise ValueError(f"the feed gave {rows} rows: expected this host's {self.per_host} or "
                       f"the global batch of {self.global_batch}")
    self.last = batch
    return batch

  def _padding(self) -> dict:
    if self.last is not None:  # zeros: masks and `valid` 0, so padding weighs nothing
      return {k: np.zeros_like(v) for k, v in self.last.items()}
    return self.iterator.padding_batch()

  def get_state(self):
    """The iterator's state for a checkpoint: every host's streams, so it resumes on any
    number of hosts."""
    state = self.iterator.get_state()
    if jax.process_count() == 1:
      return state
    from jax.experimental import multihost_utils
    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size]))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    return streams.merge_states([json.loads(bytes(b[:int(n)]))
                                 for b, n in zip(blobs, sizes.ravel())])


_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                 "tie_embeddings", "scan_layers")


def _check_init_from(cfg, model_cfg: ModelConfig) -> None:
  """The source run must have our parameter shapes; its tokenizer is ours unless one is set."""
  source = cfg.train.init_from
  try:
    theirs = run_dir.load_model_config(source)
  except FileNotFoundError as e:
    raise ConfigError(f"train.init_from={source!r}: {e}") from None
  diff = {k: (getattr(model_cfg, k), getattr(theirs, k)) for k in _SHAPE_FIELDS
          if getattr(model_cfg, k) != getattr(theirs, k)}
  if diff:
    raise ConfigError(f"train.init_from={source!r} has another architecture: " + ", ".join(
        f"model.{k}={ours} here but {src} there" for k, (ours, src) in diff.items()))
  if not cfg.data.tokenizer:
    with cfg.unlocked():
      cfg.data.tokenizer = str(files.as_path(source) / files.TOKENIZER)


def _check_resume(cfg, model_cfg: ModelConfig) -> None:
  """A workdir holding a run whose parameters have other shapes is refused, naming the model
  keys that differ, before anything in it is touched."""
  if not (files.as_path(cfg.workdir) / run_dir.CONFIG).is_file():
    return
  theirs = run_dir.load_model_config(cfg.workdir)
  shapes = [jax.tree.map(lambda x: x.shape, run_dir.abstract_params(c)[0])
            for c in (model_cfg, theirs)]
  if shapes[0] == shapes[1]:
    return
  diff = [f"model.{f.name}={getattr(model_cfg, f.name)!r} here but "
          f"{getattr(theirs, f.name)!r} there" for f in dataclasses.fields(ModelConfig)
          if getattr(model_cfg, f.name) != getattr(theirs, f.name)]
  raise ConfigError(f"workdir={cfg.workdir!r} holds a run of another architecture ("
                    f"{', '.join(diff)}); resuming it would fail. Use another workdir, or "
                    f"train.init_from={cfg.workdir!r} to start from its weights")


def _tokenizer(cfg, workdir, vocab_size, train_files):
  """Process 0 trains (or loads) the tokenizer; the others wait, then load its file."""
  if jax.process_count() == 1:
    return load_or_train_tokenizer(cfg.data, workdir, vocab_size, train_files)
  from jax.experimental import multihost_utils
  if jax.process_index() == 0:
    tokenizer = load_or_train_tokenizer(cfg.data, workdir, vocab_size, train_files)
  multihost_utils.sync_global_devices("tokenizer ready")
  if jax.process_index() != 0:
    tokenizer = load_or_train_tokenizer(cfg.data, workdir, vocab_size, train_files)
  return tokenizer


def _tokenizer_config(cfg, workdir: str, tokenizer) -> dict:
  """The chat template and special tokens (EOS, BOS: what goes around each document): the
  workdir's copy, else the source run's, else those of the directory of data.tokenizer (an HF
  model's: its tokenizer_config.json, completed by its generation_config.json, config.json)."""
  for directory in (workdir, cfg.train.init_from,
                    files.as_path(cfg.data.tokenizer).parent if cfg.data.tokenizer else ""):
    if directory:
      config = files.read_tokenizer_config(directory, tokenizer)
      if config:
        return config
  return {}


class NonFiniteError(RuntimeError):
  """A step's loss, gradient or update was not finite and train.on_nonfinite=stop."""


class _NonFinite:
  """Counts the steps whose update was skipped as non-finite (train/step.py), on the device,
  so the loop never waits for a step to find out; the host reads the counts when it logs or
  saves anyway."""

  def __init__(self, mode: str):
    self.mode = mode
    self.count = self.first = jnp.zeros((), jnp.int32)

  def add(self, step: int, nonfinite):
    self.first = jnp.where((self.count == 0) & (nonfinite > 0), step, self.first)
    self.count = self.count + nonfinite

  def snapshot(self):
    return self.count, self.first

  def check(self, snapshot, last_saved: int | None) -> int:
    """The number of skipped steps; raises NonFiniteError under "stop" if there is one."""
    count, first = (int(x) for x in jax.device_get(snapshot))
    if count and self.mode == "stop":
      kept = (f"the newest checkpoint, step {last_saved}, is the last good state"
              if last_saved is not None else "no checkpoint was written")
      raise NonFiniteError(
          f"step {first}: the loss, gradient or update is not finite (inf/nan); stopped "
          f"without saving (train.on_nonfinite=stop): {kept}. Lower train.lr or set "
          f"train.grad_clip; train.on_nonfinite=skip skips such steps instead")
    return count


def train(cfg) -> dict:
  """Runs cfg.train.steps optimizer steps (resuming from cfg.workdir). Returns last metrics."""
  workdir = cfg.workdir
  model_cfg, mesh = model_and_mesh(cfg)
  _check_resume(cfg, model_cfg)
  workdir_path = files.as_path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0

  if cfg.train.init_from:
    _check_init_from(cfg, model_cfg)
  # Data first: bad input fails here, before anything in the workdir is touched.
  train_files, val_files = data_lib.list_files(cfg.data)
  if (cfg.task != "pretrain" and not cfg.data.tokenizer
      and not (workdir_path / files.TOKENIZER).is_file()):
    raise ConfigError(f"task={cfg.task!r} needs the model's tokenizer: set data.tokenizer "
                      "or train.init_from (a run directory holding tokenizer.json)")
  tokenizer = _tokenizer(cfg, workdir, model_cfg.vocab_size, train_files)
  run = tasks.Run(workdir=workdir, tokenizer=tokenizer,
                  tokenizer_config=_tokenizer_config(cfg, workdir, tokenizer),
                  train_files=train_files, val_files=val_files)
  feed = tasks.module(cfg.task).feed(cfg, model_cfg, mesh, run)
  train_it = feed.train
  seq_len, batch_size = cfg.data.seq_len, cfg.train.batch_size

  prog = build_program(cfg, model_cfg, mesh)
  objective, abstract, shardings = prog.objective, prog.abstract, prog.shardings
  frozen = feed.load_frozen(shardings.frozen) if feed.load_frozen else None
  export = None if objective.export is None else jax.jit(objective.export)
  ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  restored = ckpt.restore_newest(abstract, shardings, separate_params=export is not None,
                                 report=lambda line: print(line, flush=True))
  latest = None if restored is None else restored[0]
  if restored is not None:
    _, state, data_state = restored
    state = state.replace(frozen=frozen)
    if data_state is not None:
      train_it.set_state(data_state)
    print(f"resumed from {ckpt.directory}/{latest}", flush=True)
  else:
    state = prog.init_state(cfg.seed, frozen)
    if objective.start is not None:
      state = state.replace(params=objective.start(state.params, frozen))
    elif cfg.train.init_from:
      state = state.replace(params=run_dir.load_params(cfg.train.init_from, model_cfg, mesh,
                                                       dense=True))
    if cfg.train.init_from:
      print(f"initialised from {cfg.train.init_from}", flush=True)
  if is_main:
    files.write_atomic(workdir_path / run_dir.CONFIG, cfg.to_json(indent=2))
    if run.tokenizer_config:  # the chat template and special tokens, for the workdir alone
      files.write_tokenizer_files(workdir, None, run.tokenizer_config)

  def model_params(state):
    return state.params if export is None else export(state.params, state.frozen)

  def save(state):
    ckpt.save(state, batches.get_state(), None if export is None else model_params(state))
    writer.flush()  # a remote metrics.jsonl is rewritten now and then: at least with each save

  p_train_step, p_eval_step = prog.train_step, prog.eval_step

  def evaluate(state) -> dict:
    """Mean val loss over the same first eval_batches batches every time, and whatever the
    task measures on its own (e.g. the score of greedy answers)."""
    out = {}
    if feed.val is not None:
      val_it = feed.val()
      batches = _HostBatches(val_it, mesh, batch_size, finite=True)
      sums = []
      for _ in range(cfg.train.eval_batches):
        try:
          sums.append(p_eval_step(state.params, state.frozen, next(batches)))
        except StopIteration:
          break
      val_it.close()
      sums = jax.device_get(sums)
      count = max(sum(s["count"] for s in sums), 1.0)
      out = {f"val_{k}": sum(s[k] for s in sums) / count for k in sums[0] if k != "count"}
      if "val_loss" in out and cfg.task in ("pretrain", "sft"):
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    if feed.evaluate is not None:
      out.update(feed.evaluate(state.params, state.frozen))
    return out

  n_params = param_count(state.params)
  cost = step_cost(objective, model_cfg, batch_size, seq_len)
  throughput = metrics_lib.Throughput(
      cost, metrics_lib.peak_flops(cfg.metrics.peak_tflops, list(mesh.devices.flat)))
  writer = metrics_lib.MetricsWriter(
      workdir, tensorboard=cfg.metrics.tensorboard, config=flatten(cfg),
      wandb={"project": cfg.metrics.wandb_project, "entity": cfg.metrics.wandb_entity,
             "name": cfg.metrics.wandb_name})
  start = int(jax.device_get(state.step))
  steps = cfg.train.steps
  if is_main:
    print(f"task {cfg.task} | {n_params / 1e6:.2f}M trained params | mesh {dict(mesh.shape)} | "
          f"{cost.tokens:.0f} tokens/step | steps {start}->{steps}", flush=True)

  if hasattr(train_it, "bind"):  # rollouts sample from the current policy
    train_it.bind(lambda: state)
  stop = preemption.StopRequest(cfg.checkpoint.preemption_check_every, start)
  batches = _HostBatches(train_it, mesh, batch_size)
  bar = Progress(steps, start, active=is_main)
  profile = StepWindow(workdir, cfg.profile.start_step, cfg.profile.steps, active=is_main)
  last, saved_step = {}, latest
  nonfinite = _NonFinite(cfg.train.on_nonfinite)
  # (step, device metrics, extra metrics, non-finite counts), logged once the next step is
  # dispatched.
  pending = None

  def log(step: int, device_metrics, extra: dict, nonfinite_counts) -> dict:
    skipped = nonfinite.check(nonfinite_counts, saved_step)
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    m.pop("count", None)
    m.pop("nonfinite", None)
    if skipped:
      m["skipped_steps"] = skipped
    m.update(throughput.read())
    m.update(extra)
    writer.write(step, m)
    bar.log(step, m)
    return m

  try:
    for i in range(start, steps):
      batch = next(batches)
      throughput.exclude(feed.off_clock())  # an RL rollout ran inside next(): not this step
      profile.before(i, state)
      if i == start:
        bar.message("compiling the train step...")
        t_compile = time.perf_counter()
      state, device_metrics = p_train_step(state, batch)
      step = i + 1
      nonfinite.add(step, device_metrics["nonfinite"])
      # Step `step` is dispatched: now read the previous step's metrics without stalling it.
      if pending is not None:
        last = log(*pending)
        pending = None
      if i == start:  # the first step compiles: keep it out of the throughput
        jax.block_until_ready(state)
        bar.message(f"compiled and ran the first step in {time.perf_counter() - t_compile:.1f} s")
        throughput.start()
      else:
        throughput.step()
      extra = dict(feed.host_metrics())
      evaluating = cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == steps
      if evaluating:
        jax.block_until_ready(state)  # so that only evaluation is taken off the clock
        t0 = time.perf_counter()
        extra.update(evaluate(state))
        throughput.exclude(time.perf_counter() - t0)
      if step % cfg.train.log_every == 0 or evaluating:
        pending = (step, device_metrics, extra, nonfinite.snapshot())
      bar.update(1)
      stopping = stop.stop(step)
      if step % cfg.checkpoint.every == 0 or step == steps or stopping:
        nonfinite.check(nonfinite.snapshot(), saved_step)  # never save past a bad step
        save(state)
        saved_step = step
      if stopping:
        break
    if pending is not None:
      last = log(*pending)
    if saved_step != int(jax.device_get(state.step)):
      nonfinite.check(nonfinite.snapshot(), saved_step)
      save(state)
  except NonFiniteError:
    bar.close()
    ckpt.close()  # the last good checkpoint finishes writing
    writer.close()
    train_it.close()
    raise
  finally:
    stop.close()
    profile.close(state)
  bar.close()
  skipped = nonfinite.check(nonfinite.snapshot(), saved_step)
  if skipped and is_main:
    print(f"{skipped} step(s) skipped: their loss, gradient or update was not finite "
          f"(train.on_nonfinite=skip)", flush=True)
  ckpt.close()
  train_it.close()

  stopped = stop.preempted or stop.requested  # no time for a sample
  if (not stopped and cfg.sample.max_new_tokens > 0 and jax.process_count() == 1
      and feed.sample_prompt is not None):
    prompt, eos_ids = feed.sample_prompt(cfg.sample.prompt)
    out = generate(model_cfg, model_params(state), [prompt],
                   max_new_tokens=cfg.sample.max_new_tokens,
                   sampling=SamplingParams(temperature=cfg.sample.temperature,
                                           top_k=cfg.sample.top_k),
                   eos_ids=eos_ids, seed=cfg.seed)[0]
    text = tokenizer.decode(prompt + out, skip_special_tokens=True)
    print(f"\n--- sample (step {int(jax.device_get(state.step))}) ---\n{text}\n---", flush=True)
    last["sample"] = text
    writer.text("sample", text, int(jax.device_get(state.step)))
  writer.hparams(last)
  writer.close()
  return last
