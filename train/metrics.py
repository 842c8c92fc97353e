"""FLOP accounting, model FLOPs utilisation, and the metric sinks (jsonl, TensorBoard)."""

import dataclasses
import functools
import json
import logging
import time
import uuid
import warnings

import jax
import jax.numpy as jnp

from infer.files import as_path, is_remote, write_atomic
from model.config import ModelConfig
from train import accelerators


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (everything but norms and the lookup):
  with experts, the router and the k experts a token is sent to (the active parameters)."""
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  if cfg.n_experts:
    ffn = d * cfg.n_experts + cfg.n_experts_per_token * 3 * d * (cfg.moe_d_ff or f)
  else:
    ffn = 3 * d * f
  per_layer = d * n * h + 2 * d * k * h + n * h * d + ffn
  head = 1 if cfg.value_head else cfg.vocab_size  # a scalar head, or the output head
  return cfg.n_layers * per_layer + d * head


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """2 FLOPs per matmul parameter, plus attention's QK^T and PV, 2 * 2 * N * H per visible
  key; a causal mask leaves (T + 1) / 2 visible keys on average, a window w of them
  mean_t min(t, w)."""
  t, w = seq_len, cfg.sliding_window
  keys = 0.0
  for layer in range(cfg.n_layers):
    if causal and cfg.is_local(layer) and w < t:
      keys += (w * (w + 1) / 2 + (t - w) * w) / t
    else:
      keys += (t + 1) / 2 if causal else t
  return 2 * matmul_params(cfg) + 4 * cfg.n_heads * cfg.head_dim * keys


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Forward + backward FLOPs per token: 3x the forward (backward is two matmuls per matmul)."""
  return 3 * forward_flops_per_token(cfg, seq_len, causal)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """What one train step does: the tokens it trains on and its model FLOPs."""
  tokens: float
  flops: float

  @classmethod
  def of(cls, seq_len: int, trained, frozen=()) -> "StepCost":
    """`trained`: (ModelConfig, rows) of each model the step runs forward and backward,
    `frozen`: of each it only runs forward (a DPO reference), over rows of `seq_len` tokens.
    The tokens are the first trained model's rows (a pair task's chosen and rejected rows
    both count; a PPO critic reads the policy's tokens again)."""
    flops = sum(rows * seq_len * training_flops_per_token(cfg, seq_len) for cfg, rows in trained)
    flops += sum(rows * seq_len * forward_flops_per_token(cfg, seq_len) for cfg, rows in frozen)
    return cls(tokens=trained[0][1] * seq_len, flops=flops)


@functools.lru_cache(maxsize=None)
def _cpu_probe_flops(n: int = 1024, repeats: int = 5) -> float:
  """The best FLOP/s of an f32 matmul on the default CPU device, measured once."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


@functools.lru_cache(maxsize=None)
def _warn_unknown_kind(kind: str) -> None:
  warnings.warn(f"no peak FLOP/s known for device kind {kind!r} (train/accelerators.py CHIPS): "
                "mfu is not reported; set metrics.peak_tflops (per device) to report it",
                RuntimeWarning, stacklevel=3)


def peak_flops(override_tflops: float = 0.0, devices=None) -> float | None:
  """Peak FLOP/s of `devices` (default: all of the job's): metrics.peak_tflops if set, else
  the chip table's dense bf16 peak (train/accelerators.py). CPU: one machine-wide matmul
  probe, since the simulated CPU devices share the same cores. An unknown device kind: None
  (no MFU) and one warning."""
  devices = jax.devices() if devices is None else devices
  if override_tflops > 0:
    return override_tflops * 1e12 * len(devices)
  kind = devices[0].device_kind
  chip = accelerators.chip_of(kind)
  if chip is not None:
    return chip.bf16_tflops * 1e12 * len(devices)
  if devices[0].platform == "cpu":
    return _cpu_probe_flops() * jax.process_count()
  _warn_unknown_kind(kind)
  return None


class Throughput:
  """Tokens/s and MFU of the train steps between two reads. Time spent on anything else
  (the first step's compilation, evaluation, RL rollouts) is taken off the clock."""

  def __init__(self, cost: StepCost, peak: float | None, clock=time.perf_counter):
    self.cost, self.peak, self.clock = cost, peak, clock
    self.t0, self.steps = None, 0

  def start(self) -> None:
    self.t0, self.steps = self.clock(), 0

  def step(self) -> None:
    self.steps += 1

  def exclude(self, seconds: float) -> None:
    if self.t0 is not None:
      self.t0 += seconds

  def read(self) -> dict:
    """{"tokens_per_s", "mfu"} since the last read ({} before any timed step; no "mfu"
    without a peak), and restarts the count."""
    out = {}
    if self.t0 is not None and self.steps:
      elapsed = self.clock() - self.t0
      out["tokens_per_s"] = self.steps * self.cost.tokens / elapsed
      if self.peak:
        out["mfu"] = self.steps * self.cost.flops / elapsed / self.peak
    if self.t0 is not None:
      self.start()
    return out


class MetricsWriter:
  """One JSON object per logged step in workdir/metrics.jsonl, TensorBoard events in
  workdir/tb, and optionally a Weights & Biases run. Only process 0 writes.

  Locally each row is appended as it comes. An object store cannot append, so remotely
  (gs://...) the whole file is rewritten, one object write at most every `flush_secs` and on
  flush() and close(); a resumed run starts from the rows already there.

  wandb: {"project": ..., "entity": ..., "name": ...} starts (or, resuming the workdir,
  continues: its id is kept in workdir/wandb_id) a W&B run with `config` as its config;
  WANDB_MODE=offline writes it under workdir/wandb without an account.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, flush_secs: float = 30.0, *,
               wandb: dict | None = None, config: dict | None = None):
    self.active = jax.process_index() == 0
    self._tb = self._wandb = None
    if not self.active:
      return
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.path, self.remote = workdir / "metrics.jsonl", is_remote(workdir)
    self.flush_secs = flush_secs
    self.config = config or {}
    if self.remote:
      self._text = self.path.read_text() if self.path.exists() else ""
      self._flushed = time.monotonic()
    else:
      self._jsonl = open(self.path, "a", buffering=1)
    if tensorboard:
      self._tb = _tensorboard(workdir / "tb")
    if wandb and wandb.get("project"):
      self._wandb = _wandb_run(workdir, wandb, self.config)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(row) + "\n"
    if self.remote:
      self._text += line
      if time.monotonic() - self._flushed >= self.flush_secs:
        self.flush()
    else:
      self._jsonl.write(line)
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

  def text(self, tag: str, text: str, step: int) -> None:
    """A text (the end-of-run sample) for TensorBoard's text tab and the W&B summary."""
    if not self.active:
      return
    if self._tb is not None:
      self._tb.add_text(tag, f"```\n{text}\n```", step)
    if self._wandb is not None:
      self._wandb.summary[tag] = text

  def hparams(self, final: dict) -> None:
    """The run's config beside its final metrics (TensorBoard's HPARAMS tab)."""
    if not self.active or self._tb is None:
      return
    hp = {k: v for k, v in self.config.items() if isinstance(v, (bool, int, float, str))}
    scalars = {f"final/{k}": float(v) for k, v in final.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    self._tb.add_hparams(hp, scalars, name=".")

  def flush(self) -> None:
    if not self.active:
      return
    if self.remote:
      write_atomic(self.path, self._text)
      self._flushed = time.monotonic()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if not self.active:
      return
    self.flush()
    if not self.remote:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _wandb_run(workdir, spec: dict, config: dict):
  """A W&B run for the workdir, resumed by the id kept in workdir/wandb_id."""
  import wandb  # the `wandb` extra
  id_file = workdir / "wandb_id"
  run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
  if not id_file.exists():
    write_atomic(id_file, run_id)
  local = str(workdir) if not is_remote(workdir) else None  # W&B keeps its files locally
  return wandb.init(project=spec["project"], entity=spec.get("entity") or None,
                    name=spec.get("name") or workdir.name, id=run_id, resume="allow",
                    dir=local, config=config)


def _tensorboard(directory):
  """A tensorboardX SummaryWriter, or None (with one message) where it cannot write: it
  writes local paths, gs:// (with google-cloud-storage) and s3:// (with boto3)."""
  path = str(directory)
  try:
    if is_remote(path) and not path.startswith(("gs://", "s3://")):
      raise ValueError("tensorboardX writes only local, gs:// and s3:// paths")
    from tensorboardX import SummaryWriter
    return SummaryWriter(path)
  except Exception as e:  # a missing client library, or credentials: metrics.jsonl remains
    logging.getLogger(__name__).warning(
        f"TensorBoard: not writing events to {path} ({type(e).__name__}: {e}); "
        "metrics.jsonl has the same numbers (or set metrics.tensorboard=False)")
    return None
