"""The post-training tasks' losses against closed forms and numpy, and every task's train
step sharded over 8 simulated devices against one device."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, sharding
from train import posttrain_data
from train.config import load_config
from train.loop import build_program
from train.tasks import dpo, reward
from train.tokenizer import train_tokenizer

VOCAB, T = 128, 16
TASKS = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")


def small_config(task: str, **overrides):
  cfg = load_config("configs/base.py", {})
  with cfg.unlocked():
    cfg.task = task
    cfg.model.update(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     d_ff=64, max_seq_len=64, value_head=task == "reward")
    cfg.data.seq_len = T
    cfg.train.update(batch_size=8, lr=1e-2, warmup_steps=0, steps=10)
    cfg.train.init_from = "unused"  # tasks after SFT start from a run; not loaded here
    cfg.rl.update(prompts_per_rollout=8, group_size=2, max_new_tokens=4, reward_fn="m:f")
    for key, value in overrides.items():
      section, name = key.split("__")
      cfg[section][name] = value
  return cfg


def random_batch(shapes: dict, seed: int = 0) -> dict:
  """A plausible batch for any task: real tokens then right padding, masks on a suffix."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, (shape, dtype) in shapes.items():
    # chosen_inputs -> inputs, ...: pair batches hold two sets of the same arrays.
    key = name.split("_", 1)[1] if name.startswith(("chosen_", "rejected_")) else name
    if len(shape) == 1:  # per row
      b = shape[0]
      value = {"valid": np.ones(b), "margin": rng.uniform(0, 1, b), "last": np.full(b, T - 3),
               "ref_chosen": -rng.uniform(5, 20, b), "ref_rejected": -rng.uniform(5, 20, b)}
      out[name] = value.get(key, np.zeros(b)).astype(dtype)
      continue
    b, t = shape
    real = np.arange(t)[None, :] < (t - 2 - np.arange(b) % 3)[:, None]
    if key in ("inputs", "targets"):
      value = rng.integers(0, VOCAB, shape) * real
    elif key == "positions":
      value = np.broadcast_to(np.arange(t), shape) * real
    elif key == "segment_ids":
      value = real
    elif key in ("loss_mask", "mask"):
      value = real & (np.arange(t)[None, :] >= 5)
    elif key in ("old_logp", "ref_logp"):
      value = -rng.uniform(0, 6, shape) * real
    else:  # advantages, returns, old_values
      value = rng.normal(size=shape) * real
    out[name] = np.asarray(value, dtype)
  return out


def _init_frozen(prog, seed=1):
  if prog.objective.init_frozen is None:
    return None
  init = lambda: nn.unbox(prog.objective.init_frozen(jax.random.PRNGKey(seed)))
  return jax.jit(init, out_shardings=prog.shardings.frozen)()


def _losses(cfg, mesh, steps=2):
  prog = build_program(cfg, ModelConfig.from_config(cfg.model), mesh)
  state = prog.init_state(cfg.seed, _init_frozen(prog))
  shapes = prog.objective.batch_shapes(cfg.train.batch_size, cfg.data.seq_len)
  losses = []
  for s in range(steps):
    batch = jax.device_put(random_batch(shapes, seed=s), prog.batch_sharding)
    state, m = prog.train_step(state, batch)
    losses.append(float(m["loss"]))
  return losses


@pytest.mark.parametrize("task", TASKS)
def test_every_task_step_is_the_same_on_8_devices(task):
  cfg = small_config(task)
  one = _losses(cfg, sharding.make_mesh(1, 1, 1, jax.devices()[:1]))
  eight = _losses(cfg, sharding.make_mesh(2, 2, 2))
  assert all(math.isfinite(x) for x in one), one
  np.testing.assert_allclose(eight, one, rtol=2e-4, atol=1e-6)


def _program(task, **overrides):
  cfg = small_config(task, **overrides)
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  return cfg, build_program(cfg, ModelConfig.from_config(cfg.model), mesh)


def _sums(prog, params, frozen, batch):
  _, sums = prog.objective.loss_fn(params, frozen, batch)
  return {k: float(v) for k, v in sums.items()}


def _numpy_logprobs(cfg, params, tokens):
  """log softmax of the model's logits at the targets, by numpy (float64)."""
  logits, _ = reward.Transformer(ModelConfig.from_config(cfg.model)).apply(
      {"params": params}, tokens["inputs"], tokens["positions"],
      segment_ids=tokens["segment_ids"])
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return np.take_along_axis(logits, np.asarray(tokens["targets"])[..., None], -1)[..., 0] - logz


def test_sft_loss_is_cross_entropy_over_trainable_positions():
  cfg, prog = _program("sft")
  state = prog.init_state(0)
  batch = random_batch(prog.objective.batch_shapes(4, T))
  sums = _sums(prog, state.params, None, batch)
  logp = _numpy_logprobs(cfg, state.params, batch)
  mask = batch["loss_mask"]
  np.testing.assert_allclose(sums["loss"] / sums["count"], -(logp * mask).sum() / mask.sum(),
                             rtol=1e-5)
  assert sums["count"] == mask.sum()


def _sft_rows():
  return [{"prompt": f"q{i} " * (1 + i % 3), "completion": f"a{i}" * (1 + i % 2)}
          for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer():
  return train_tokenizer([f"q{i} a{i}" for i in range(20)] * 5, 300)


def _sft_batch(tokenizer, pack: bool, batch_size: int):
  data_cfg = small_config("sft").data
  with data_cfg.unlocked():
    data_cfg.pack, data_cfg.seq_len = pack, 32
  fmt = posttrain_data.Formatter(tokenizer, {}, data_cfg)
  it = posttrain_data.sft_batches(_sft_rows(), fmt, data_cfg, batch_size=batch_size, seed=0,
                                  shuffle=False, repeat=False)
  return {k: v for k, v in next(it).items() if k != "index"}


def test_sft_packed_equals_padded_and_accumulation_equals_one_batch(tokenizer):
  import optax
  from train import step as step_lib
  from train.state import abstract_state, create_state
  cfg, prog = _program("sft", model__vocab_size=512, data__seq_len=32)
  packed, padded = _sft_batch(tokenizer, True, 4), _sft_batch(tokenizer, False, 12)
  assert packed["segment_ids"].max() > 1  # several examples share a row
  state = prog.init_state(0)
  a, b = _sums(prog, state.params, None, packed), _sums(prog, state.params, None, padded)
  assert a["count"] == b["count"]
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  # Plain SGD: the update is the gradient, so 2 microbatches x 2 rows must equal 1 x 4.
  tx = optax.sgd(1.0)
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  shardings = abstract_state(prog.objective.init, tx, mesh)[1]
  state = create_state(prog.objective.init, tx, mesh, 0, shardings)
  batch = {k: v[:4] for k, v in padded.items()}
  updates = []
  for n in (1, 2):
    step = jax.jit(step_lib.make_train_step(prog.objective.loss_fn, tx, microbatches=n,
                                            mesh=mesh, param_shardings=shardings.params))
    new, m = step(state, batch)
    updates.append((float(m["loss"]), jax.tree.map(jnp.subtract, new.params, state.params)))
  np.testing.assert_allclose(updates[1][0], updates[0][0], rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7, rtol=1e-4),
               updates[1][1], updates[0][1])


def test_sft_trains_the_final_eos_when_pad_is_eos(tokenizer):
  batch = _sft_batch(tokenizer, False, 12)
  eos = tokenizer.token_to_id("<|endoftext|>")
  assert eos == 0  # our pad id too
  for r in range(12):
    trained = batch["targets"][r][batch["loss_mask"][r] > 0]
    assert trained[-1] == eos


def _pair_batch(b=4, t=T, seed=0):
  return random_batch(reward.common.pair_batch_shapes(b, t), seed)


def test_reward_at_init_is_ln2_and_margins_shift_it():
  cfg, prog = _program("reward")
  state = prog.init_state(0)  # zero value head: every score is 0
  batch = _pair_batch()
  batch["margin"][:] = 0.0
  sums = _sums(prog, state.params, None, batch)
  np.testing.assert_allclose(sums["loss"] / sums["count"], math.log(2), rtol=1e-6)
  assert sums["accuracy"] == 0  # strict: equal scores are not a win
  batch["margin"][:] = 1.5
  sums = _sums(prog, state.params, None, batch)
  np.testing.assert_allclose(sums["loss"] / sums["count"], -math.log(1 / (1 + math.exp(1.5))),
                             rtol=1e-6)


def test_reward_left_and_right_padding_score_the_same():
  cfg, prog = _program("reward")
  params = prog.init_state(0).params
  params = dict(params, value_head=jax.random.normal(jax.random.PRNGKey(3), (32,)))
  rng = np.random.default_rng(0)
  n = 10
  tokens = rng.integers(1, VOCAB, (1, n))
  right = {"inputs": np.zeros((1, T), np.int32), "positions": np.zeros((1, T), np.int32),
           "segment_ids": np.zeros((1, T), np.int32)}
  left = {k: v.copy() for k, v in right.items()}
  right["inputs"][0, :n], right["positions"][0, :n], right["segment_ids"][0, :n] = (
      tokens, np.arange(n), 1)
  left["inputs"][0, -n:], left["positions"][0, -n:], left["segment_ids"][0, -n:] = (
      tokens, np.arange(n), 1)
  model = reward.Transformer(ModelConfig.from_config(cfg.model))
  score = lambda x: reward.common.scores_at_last(
      model.apply({"params": params}, x["inputs"], x["positions"],
                  segment_ids=x["segment_ids"])[0], x["segment_ids"])
  np.testing.assert_allclose(score(left), score(right), rtol=1e-5, atol=1e-6)
  assert float(score(right)[0]) != 0.0


def test_dpo_at_init_is_ln2_with_zero_rewards():
  cfg, prog = _program("dpo")
  state = prog.init_state(0)
  sums = _sums(prog, state.params, {"reference": state.params}, _pair_batch())
  np.testing.assert_allclose(sums["loss"] / sums["count"], 0.693147, atol=1e-6)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    assert sums[k] == 0.0


def test_dpo_sequence_logprobs_match_numpy_and_ignore_padding():
  cfg, prog = _program("dpo")
  params = prog.init_state(0).params
  model = dpo.Transformer(ModelConfig.from_config(cfg.model))
  batch = _pair_batch()
  c, r = dpo.pair_logprobs(model, params, batch, per_token=False)
  tokens = dpo.common.pair_tokens(batch)
  logp = _numpy_logprobs(cfg, params, {k: np.asarray(v) for k, v in tokens.items()})
  expected = (logp * np.asarray(tokens["loss_mask"])).sum(1)
  np.testing.assert_allclose(np.concatenate([c, r]), expected, rtol=1e-5)
  # More right padding, with another pad id, changes nothing.
  wider = {}
  for k, v in batch.items():
    if v.ndim == 2:
      pad = np.full((v.shape[0], 8), 7 if k.endswith(("inputs", "targets")) else 0, v.dtype)
      wider[k] = np.concatenate([v, pad], axis=1)
    else:
      wider[k] = v
  c2, r2 = dpo.pair_logprobs(model, params, wider, per_token=False)
  np.testing.assert_allclose(np.concatenate([c2, r2]), expected, rtol=1e-5)


def test_dpo_precomputed_reference_equals_on_the_fly():
  cfg, prog = _program("dpo")
  _, pre = _program("dpo", dpo__precompute_reference=True)
  policy, ref = prog.init_state(0).params, prog.init_state(5).params
  batch = _pair_batch()
  model = dpo.Transformer(ModelConfig.from_config(cfg.model))
  ref_c, ref_r = dpo.pair_logprobs(model, ref, batch, per_token=False)
  with_refs = dict(batch, ref_chosen=np.asarray(ref_c), ref_rejected=np.asarray(ref_r))
  a = _sums(prog, policy, {"reference": ref}, batch)
  b = _sums(pre, policy, None, with_refs)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7)
  assert a["loss"] != pytest.approx(0.693147 * a["count"])


def test_dpo_one_step_raises_the_pair_margin():
  cfg, prog = _program("dpo", train__lr=1e-3)
  state = prog.init_state(0)
  # A copy: the step donates the state, and a buffer cannot be donated twice.
  state = state.replace(frozen={"reference": jax.tree.map(jnp.copy, state.params)})
  batch = random_batch(prog.objective.batch_shapes(8, T))
  before = _sums(prog, state.params, state.frozen, batch)
  state, _ = prog.train_step(state, jax.device_put(batch, prog.batch_sharding))
  after = _sums(prog, state.params, state.frozen, batch)
  assert before["rewards/margins"] == 0.0 < after["rewards/margins"]
  assert after["loss"] < before["loss"]


def test_ppo_and_grpo_policy_equal_to_reference_give_zero_kl():
  for task in ("ppo", "grpo"):
    cfg, prog = _program(task)
    state = prog.init_state(0)
    policy = state.params["policy"] if task == "ppo" else state.params
    batch = random_batch(prog.objective.batch_shapes(4, T))
    model = dpo.Transformer(ModelConfig.from_config(cfg.model))
    from train.tasks import rl
    logp, _ = rl.trainer_logprobs(model, policy, batch, cfg.rl.temperature)
    batch["old_logp"] = batch["ref_logp"] = np.asarray(logp) * batch["mask"]
    sums = _sums(prog, state.params, {"reference": policy}, batch)
    np.testing.assert_allclose(sums["approx_kl"], 0.0, atol=1e-9)
    np.testing.assert_allclose(sums["clip_fraction"], 0.0)
    if task == "grpo":
      np.testing.assert_allclose(sums["kl_penalty"], 0.0, atol=1e-6)
