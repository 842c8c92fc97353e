"""MFU: peak FLOP/s from the chip table, no MFU (and one warning) for a chip we do not know, and
each task's FLOPs per train step against XLA's own count of the compiled step's HLO."""

import types
import warnings

import jax
import pytest

from model import ModelConfig, sharding
from train import metrics
from train.loop import build_program, step_cost
from tests.test_tasks import small_config


def device(kind: str, platform: str = "tpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_peak_comes_from_the_chip_table():
  # Data sheets: v5e 197 TFLOP/s bf16 per chip, H100 SXM 989, T4 65 (fp16).
  assert metrics.peak_flops(devices=[device("TPU v5 lite")] * 4) == 4 * 197e12
  assert metrics.peak_flops(devices=[device("NVIDIA H100 80GB HBM3", "gpu")] * 8) == 8 * 989e12
  assert metrics.peak_flops(devices=[device("Tesla T4", "gpu")]) == 65e12
  assert metrics.peak_flops(2.0, devices=[device("anything")] * 3) == 6e12  # the override


def test_an_unknown_chip_warns_once_and_gives_no_mfu():
  kind = "Imaginary NPU 9000 (tests/test_mfu.py)"
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peaks = [metrics.peak_flops(devices=[device(kind, "npu")]) for _ in range(3)]
  assert peaks == [None] * 3
  assert len(caught) == 1 and kind in str(caught[0].message)
  assert "metrics.peak_tflops" in str(caught[0].message)

  clock = iter([0.0, 2.0, 2.0]).__next__  # start, read, restart
  throughput = metrics.Throughput(metrics.StepCost(tokens=100, flops=1e9), None, clock=clock)
  throughput.start()
  throughput.step()
  assert throughput.read() == {"tokens_per_s": 50.0}  # no "mfu" key at all


def test_time_off_the_clock_is_not_the_steps():
  """A fake clock: 2 steps in 10 s of which 8 s were a rollout (or evaluation)."""
  times = iter([0.0, 10.0, 10.0]).__next__  # start, read, restart
  throughput = metrics.Throughput(metrics.StepCost(tokens=100, flops=4e12), 1e12, clock=times)
  throughput.start()
  throughput.step()
  throughput.exclude(8.0)
  throughput.step()
  assert throughput.read() == {"tokens_per_s": 100.0, "mfu": 4.0}


def _xla_flops(cfg, head_tokens: int):
  """(XLA's FLOPs of the lowered train step, our StepCost) for a task config on one device.
  Layers unrolled: XLA's cost analysis counts a loop body (the scanned layers) once.
  head_tokens: tokens whose LM-head scores are trained. model/head.py's backward recomputes
  their logits (2·D·V FLOPs a token), work the HLO has but model FLOPs (MFU's convention, like
  activation remat) leave out; it is taken off XLA's count."""
  with cfg.unlocked():
    cfg.model.scan_layers = False
  model_cfg = ModelConfig.from_config(cfg.model)
  prog = build_program(cfg, model_cfg, sharding.make_mesh(1, 1, 1, jax.devices()[:1]))
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       prog.abstract, prog.shardings)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=prog.batch_sharding)
           for k, (shape, dtype) in prog.objective.batch_shapes(b, t).items()}
  cost = prog.train_step.lower(state, batch).cost_analysis()
  recompute = 2 * model_cfg.d_model * model_cfg.vocab_size * head_tokens
  return float(cost["flops"]) - recompute, step_cost(prog.objective, model_cfg, b, t)


def test_pair_and_rl_tasks_count_every_forward_in_their_steps():
  """Relative to pretraining's step at the same batch: the reward model trains on chosen and
  rejected rows (2x, less the LM head it lacks); DPO also runs its frozen reference forward
  over both (8/3x), or not when its log-probs are precomputed (2x); PPO trains a critic beside
  the policy. Ours must match XLA's count of the same HLO; the elementwise work XLA also
  counts (~12% here) cancels in the ratio."""
  b, t = 8, 16  # tests/test_tasks.small_config
  base_xla, base = _xla_flops(small_config("pretrain"), head_tokens=b * t)
  assert base.tokens == b * t
  cases = {"reward": small_config("reward"), "dpo": small_config("dpo"),
           "dpo_precomputed": small_config("dpo", dpo__precompute_reference=True),
           "ppo": small_config("ppo")}
  ratios = {}
  # The reward model has no LM head; DPO trains the policy's on both rows; PPO's policy on one.
  head_tokens = {"reward": 0, "dpo": 2 * b * t, "dpo_precomputed": 2 * b * t, "ppo": b * t}
  for name, cfg in cases.items():
    xla, ours = _xla_flops(cfg, head_tokens[name])
    ratios[name] = ours.flops / base.flops
    assert ratios[name] == pytest.approx(xla / base_xla, rel=0.04), name
    assert ours.tokens == (2 * b * t if name != "ppo" else b * t), name
  # Same model: 2 rows x 3 forwards trained + 2 rows x 1 forward frozen, over 3 forwards.
  assert ratios["dpo"] == pytest.approx(8 / 3) and ratios["dpo_precomputed"] == pytest.approx(2)
