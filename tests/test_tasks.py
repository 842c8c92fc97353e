"""The post-training tasks' losses against closed forms and numpy, every task's train step
sharded over 8 simulated devices against one device, and an MoE model's router losses in
each objective against an independent forward."""

import dataclasses
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


# Mixture-of-experts policies: every trained forward's router loss is in the objective.
# A tiny MoE (tests/test_moe.py, tests/test_train_step.py): 2 layers, d_model 32, 4 experts of
# width 32, top-2. Coefficients large enough that the router term stands out of f32 noise.
MOE = dict(model__n_experts=4, model__n_experts_per_token=2, model__moe_d_ff=32)
COEFS = dict(model__router_aux_loss_coef=0.1, model__router_z_loss_coef=0.01)
NO_COEFS = dict(model__router_aux_loss_coef=0.0, model__router_z_loss_coef=0.0)
MOE_METRICS = ("aux_loss", "z_loss", "load_max", "load_min", "dropped_frac")


@pytest.fixture
def quick_moe_compiles():
  """XLA's optimisations cost more than they save on these tiny programs (on 2 CPU cores an
  MoE model's init compiles in 10 s with them, 1 s without)."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def _router_stats(model_cfg, params, rows):
  """The router statistics of a forward of `rows`, by a plain apply of the module that
  collects its intermediates (not the tasks' code path)."""
  _, state = reward.Transformer(model_cfg).apply(
      {"params": params}, jnp.asarray(rows["inputs"]), jnp.asarray(rows["positions"]),
      segment_ids=jnp.asarray(rows["segment_ids"]), mutable=["intermediates"])
  return state["intermediates"]["moe"][0]


def _moe_case(task, agg):
  """(the objective with router coefficients off, with them on, params, frozen, batch, and
  the trained forwards: [(name in params or None, model config, rows, count, weight)])."""
  from train import tasks
  extra = {} if agg is None else {"rl__loss_agg": agg}
  cfg = small_config(task, **MOE, **COEFS, **extra)
  model_cfg = ModelConfig.from_config(cfg.model)
  obj0, obj = [tasks.module(task).objective(c, ModelConfig.from_config(c.model))
               for c in (small_config(task, **MOE, **NO_COEFS, **extra), cfg)]
  init = jax.jit(lambda key: nn.unbox(obj.init(key)))
  params = init(jax.random.PRNGKey(0))
  batch = random_batch(obj.batch_shapes(4, T), seed=1)
  if task in ("dpo", "reward"):
    # One forward over the chosen rows then the rejected rows, normalised per real pair.
    rows = {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
            for k in ("inputs", "positions", "segment_ids")}
    count = batch["valid"].sum()
  else:
    rows = batch
    per_seq = task == "grpo" and agg == "grpo"
    count = (batch["mask"].sum(1) > 0).sum() if per_seq else batch["mask"].sum()
  frozen = None
  if task in ("dpo", "ppo", "grpo"):  # another model as the reference: its forward adds nothing
    other = init(jax.random.PRNGKey(7))
    frozen = {"reference": other["policy"] if task == "ppo" else other}
  forwards = [(None, model_cfg, rows, count, 1.0)]
  if task == "ppo":
    forwards = [("policy", dataclasses.replace(model_cfg, value_head=False), rows, count, 1.0),
                ("value", dataclasses.replace(model_cfg, value_head=True), rows, count,
                 cfg.rl.vf_coef)]
  return obj0, obj, params, frozen, batch, forwards


def _router_objective(params, forwards):
  """(sum over the trained forwards of weight * count * (0.1 load balancing + 0.01 z), their
  router statistics)."""
  total, auxes = 0.0, []
  for name, model_cfg, rows, count, weight in forwards:
    aux = _router_stats(model_cfg, params if name is None else params[name], rows)
    total += weight * count * (0.1 * aux.load_balancing_loss + 0.01 * aux.z_loss)
    auxes.append(aux)
  return total, auxes


def _routers(grads, forwards):
  return [(grads if name is None else grads[name])["layers"]["moe"]["router"]
          for name, *_ in forwards]


@pytest.mark.parametrize("task,agg", [("dpo", None), ("reward", None), ("ppo", None),
                                      ("grpo", "grpo"), ("grpo", "bnpo")])
@pytest.mark.usefixtures("quick_moe_compiles")
def test_moe_router_loss_is_in_every_post_training_objective(task, agg):
  obj0, obj, params, frozen, batch, forwards = _moe_case(task, agg)

  def all_three(params):  # one program: compiled once, the shared forwards once
    run = lambda f: jax.value_and_grad(f, has_aux=True)(params)
    return (run(lambda p: obj0.loss_fn(p, frozen, batch)),
            run(lambda p: obj.loss_fn(p, frozen, batch)),
            run(lambda p: _router_objective(p, forwards)))

  (((total0, sums0), grads0), ((total, sums), grads),
   ((expected, auxes), ref_grads)) = jax.jit(all_three)(params)
  # (a) The objective with the router coefficients on is the one without them plus the
  # router losses of the trained forwards from an independent apply, per count unit.
  np.testing.assert_allclose(float(total - total0), float(expected), rtol=2e-4)
  assert float(expected) > 0.01 * float(sums["count"])
  np.testing.assert_allclose(float(sums["loss"]), float(sums0["loss"]), rtol=1e-6)
  # (b) Through the router term every trained router gets the gradient of that reference.
  diffs = _routers(jax.tree.map(jnp.subtract, grads, grads0), forwards)
  for diff, ref in zip(diffs, _routers(ref_grads, forwards)):
    assert float(jnp.max(jnp.abs(ref))) > 1e-4
    np.testing.assert_allclose(diff, ref, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  # (c) The moe_* metrics, as sums over the count like every other metric (value_moe_*: the
  # critic's).
  for (name, _, _, count, _), aux in zip(forwards, auxes):
    prefix = "value_moe" if name == "value" else "moe"
    assert {f"{prefix}_{k}" for k in MOE_METRICS} <= set(sums)
    np.testing.assert_allclose(float(sums[f"{prefix}_aux_loss"]) / count,
                               aux.load_balancing_loss, rtol=1e-5)
    np.testing.assert_allclose(float(sums[f"{prefix}_z_loss"]) / count, aux.z_loss, rtol=1e-5)
    assert float(sums[f"{prefix}_load_max"]) >= float(sums[f"{prefix}_load_min"]) >= 0
    assert float(sums[f"{prefix}_dropped_frac"]) == 0.0  # dropless
  if task != "ppo":
    assert not any(k.startswith("value_moe") for k in sums)


@pytest.mark.parametrize("task", ["dpo", "reward", "ppo", "grpo"])
@pytest.mark.usefixtures("quick_moe_compiles")
def test_moe_train_step_and_rollout_scoring_run_and_log_router_metrics(task):
  """Each MoE objective's jitted step logs moe_* means; the undifferentiated forwards (PPO and
  GRPO's rollout `prepare`, DPO's reference pre-computation) run on an MoE model."""
  from train.tasks import grpo, ppo
  cfg, prog = _program(task, **MOE, **COEFS)
  state = prog.init_state(0)
  frozen = state.frozen
  if task != "reward":  # a copy: the step donates the state
    frozen = {"reference": jax.tree.map(jnp.copy, state.params["policy"] if task == "ppo"
                                        else state.params)}
    state = state.replace(frozen=frozen)
  batch = random_batch(prog.objective.batch_shapes(cfg.train.batch_size, T))
  policy = dpo.common.Policy.of(cfg, ModelConfig.from_config(cfg.model))
  if task in ("ppo", "grpo"):
    rows = {k: batch[k] for k in ("inputs", "targets", "positions", "segment_ids", "mask")}
    scores = np.linspace(-1, 1, cfg.train.batch_size).astype(np.float32)
    if task == "ppo":
      critic = reward.Transformer(dpo.common.value_config(policy.model_cfg))
      arrays, _ = jax.jit(lambda p, f: ppo.prepare(p, f, rows, scores, 0.05, policy=policy,
                                                   critic=critic, cfg=cfg))(
          state.params, frozen)
    else:
      arrays, _ = jax.jit(lambda p, f: grpo.prepare(p, f, rows, scores, 0.05, policy=policy,
                                                    cfg=cfg))(state.params, frozen)
    assert all(np.isfinite(v).all() for v in jax.device_get(arrays).values())
    batch.update({k: np.asarray(v) for k, v in arrays.items()})
  if task == "dpo":
    ref_c, ref_r = jax.jit(lambda p: dpo.pair_logprobs(policy.model, p, batch,
                                                       per_token=False))(state.params)
    assert np.isfinite(ref_c).all() and np.isfinite(ref_r).all()
  state, m = prog.train_step(state, jax.device_put(batch, prog.batch_sharding))
  names = {f"moe_{k}" for k in MOE_METRICS}
  if task == "ppo":
    names |= {f"value_moe_{k}" for k in MOE_METRICS}
  assert names <= set(m), (task, sorted(m))
  assert all(math.isfinite(float(m[k])) for k in names | {"loss", "grad_norm"})
  assert 0.5 < float(m["moe_aux_loss"]) < 4.0  # E sum f P: 1 balanced, at most E
