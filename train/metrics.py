"""FLOP accounting, model FLOPs utilisation, and the metric sinks (jsonl, TensorBoard)."""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from model.config import ModelConfig

# Dense bf16 peak TFLOP/s per chip, from the vendors' data sheets.
PEAK_TFLOPS = (
    ("TPU v6", 918.0),  # Trillium (v6e); device_kind "TPU v6 lite"
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),  # plain "TPU v5" is v5p
    ("TPU v4", 275.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; the PCIe card is lower, override metrics.peak_tflops
    ("A100", 312.0),
)


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (everything but norms and the lookup)."""
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
  return cfg.n_layers * per_layer + d * cfg.vocab_size  # + the output head


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Forward + backward FLOPs per token: 3x the forward (backward is two matmuls per matmul).

  Forward: 2 FLOPs per matmul parameter, plus attention's QK^T and PV, 2 * 2 * N * H per
  visible key; a causal mask leaves (T + 1) / 2 visible keys on average.
  """
  keys = (seq_len + 1) / 2 if causal else seq_len
  attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys
  return 3 * (2 * matmul_params(cfg) + attention)


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


def peak_flops(override_tflops: float = 0.0, devices=None) -> float:
  """Peak FLOP/s of the devices in the job. CPU: one machine-wide matmul probe, since the
  simulated CPU devices share the same cores."""
  if override_tflops > 0:
    devices = jax.devices() if devices is None else devices
    return override_tflops * 1e12 * len(devices)
  devices = jax.devices() if devices is None else devices
  kind = devices[0].device_kind
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12 * len(devices)
  if devices[0].platform == "cpu":
    return _cpu_probe_flops() * jax.process_count()
  raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; "
                   "set metrics.peak_tflops (per device)")


class MetricsWriter:
  """Appends one JSON object per logged step to workdir/metrics.jsonl, and TensorBoard events
  to workdir/tb. Only process 0 writes."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if not self.active:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
