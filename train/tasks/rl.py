"""What PPO and GRPO share: rollouts from the current policy with infer/'s jitted decode
loop, scored by a reward function or a reward model, turned into minibatches for the step.

A rollout (as in PPO for RLHF, Ouyang et al. 2022):
  1. rl.prompts_per_rollout prompts (each repeated rl.group_size times for GRPO) are sampled
     at rl.temperature by infer.decode (which stops each row at its EOS);
  2. prompt + completion become one right-padded row of T = data.seq_len tokens, with
     `mask` 1 on the completion's targets (the EOS included);
  3. the source scores each completion (rl.no_eos_penalty added when it never stopped);
  4. a task-specific jitted `prepare` adds the trainer's log-probs at that temperature
     (the ratio's "old" side), the reference's, and advantages;
  5. rl.epochs passes of shuffled minibatches of train.batch_size rows feed the step.
The iterator's state (prompt position, KL coefficient, rollout count) goes into checkpoints;
a resumed run starts a fresh rollout.
"""

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infer import workdir as run_dir
from infer.decode import generate_with_stats
from infer.sampling import SamplingParams
from model import Transformer, head
from train import objectives, posttrain_data
from train.config import ConfigError
from train.tasks import Feed, common, pretrain

ROLLOUT_KEYS = ("inputs", "targets", "positions", "segment_ids", "mask")


def check(cfg, group_size: int) -> None:
  r = cfg.rl
  if bool(r.reward_fn) == bool(r.reward_model):
    raise ConfigError(f"task={cfg.task!r} needs exactly one reward source: rl.reward_fn "
                      "('module:function') or rl.reward_model (a reward-model run)")
  if r.temperature <= 0:
    raise ConfigError(f"rl.temperature={r.temperature} must be > 0: rollouts sample")
  n = r.prompts_per_rollout * group_size
  if n % cfg.train.batch_size:
    raise ConfigError(f"a rollout of rl.prompts_per_rollout x group = {n} sequences does not "
                      f"split into minibatches of train.batch_size={cfg.train.batch_size}")
  if r.max_new_tokens < 1 or r.max_new_tokens >= cfg.data.seq_len:
    raise ConfigError(f"rl.max_new_tokens={r.max_new_tokens} must be in [1, data.seq_len)")
  if r.kl_estimator not in objectives.KL_KINDS:
    raise ConfigError(f"rl.kl_estimator={r.kl_estimator!r} is not one of "
                      f"{list(objectives.KL_KINDS)}")
  if not cfg.train.init_from:
    raise ConfigError(f"task={cfg.task!r} starts from a trained policy (usually an SFT run): "
                      "set train.init_from")


def rollout_shapes(batch_size: int, seq_len: int, extra=()) -> dict:
  shape = (batch_size, seq_len)
  out = {k: (shape, np.int32) for k in ROLLOUT_KEYS[:4]}
  out.update({k: (shape, np.float32) for k in ("mask",) + tuple(extra)})
  return out


def rows_of(prompt_ids, completions, seq_len: int) -> dict:
  """Right-padded [N, T] arrays of prompt + completion; `mask` marks completion targets."""
  n = len(prompt_ids)
  out = {k: np.zeros((n, seq_len), np.int32) for k in ROLLOUT_KEYS[:4]}
  out["mask"] = np.zeros((n, seq_len), np.float32)
  for i, (p, c) in enumerate(zip(prompt_ids, completions)):
    seq = np.asarray(list(p) + list(c), np.int32)[:seq_len + 1]
    length = len(seq) - 1
    out["inputs"][i, :length], out["targets"][i, :length] = seq[:-1], seq[1:]
    out["positions"][i, :length] = np.arange(length)
    out["segment_ids"][i, :length] = 1
    out["mask"][i, len(p) - 1:length] = 1.0
  return out


class Scorer:
  """Scores completions: rl.reward_fn(prompt text, completion text) -> float, or the value a
  reward model (task=reward run) gives at the last token of prompt + completion."""

  def __init__(self, cfg, tokenizer, mesh):
    self.tokenizer, self.seq_len = tokenizer, cfg.data.seq_len
    self.fn = common.reward_function(cfg.rl.reward_fn) if cfg.rl.reward_fn else None
    if self.fn is None:
      rm_cfg = run_dir.load_model_config(cfg.rl.reward_model)
      if not rm_cfg.value_head:
        raise ConfigError(f"rl.reward_model={cfg.rl.reward_model!r} is not a reward model "
                          "(its model.value_head is False)")
      self.params = run_dir.load_params(cfg.rl.reward_model, rm_cfg, mesh)
      model = Transformer(rm_cfg)

      @jax.jit
      def score(params, rows):
        values, _ = pretrain.forward(model, params, rows)  # an MoE's router stats unused
        return common.scores_at_last(values, rows["segment_ids"])
      self.score = score

  def __call__(self, prompt_texts, prompt_ids, completions) -> np.ndarray:
    if self.fn is not None:
      decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
      return np.array([self.fn(p, decode(c)) for p, c in zip(prompt_texts, completions)],
                      np.float32)
    # The reward model reads the whole sequence, last token included: one dummy token after
    # each completion makes the rows' inputs exactly prompt + completion.
    rows = rows_of(prompt_ids, [list(c) + [0] for c in completions], self.seq_len)
    return np.asarray(jax.device_get(self.score(self.params, rows)), np.float32)


class Rollouts:
  """The train iterator of PPO and GRPO: minibatches of rollouts of the current policy.

  `prepare(params, frozen, rows, scores, kl_coef) -> (arrays, metrics)` is the task's jitted
  function adding log-probs and advantages; `bind(current_state)` (called by the loop) gives
  access to the current train state."""

  def __init__(self, cfg, model_cfg, run, formatter, scorer, to_policy, prepare, *,
               group_size: int):
    self.cfg, self.model_cfg, self.formatter, self.scorer = cfg, model_cfg, formatter, scorer
    self.group_size, self.to_policy, self.prepare = group_size, jax.jit(to_policy), prepare
    # Prompts keep room for the answer: at most T - max_new_tokens tokens.
    prompt_cfg = ml_collections.ConfigDict(dict(cfg.data))
    prompt_cfg.seq_len = cfg.data.seq_len - cfg.rl.max_new_tokens + 1
    self.prompts = posttrain_data.make_batches(
        "prompts", run.train_files, formatter, prompt_cfg,
        batch_size=cfg.rl.prompts_per_rollout, seed=cfg.seed, shuffle=True, repeat=True)
    self.kl_coef, self.count = float(cfg.rl.kl_coef), 0
    self.buffer, self.metrics, self.current = [], {}, None
    self.rollout_seconds = 0.0  # since the loop last took them (take_rollout_seconds)

  def bind(self, current_state):
    self.current = current_state

  def take_rollout_seconds(self) -> float:
    """Seconds spent in rollouts since the last call: the loop takes them off the train
    step's clock (Feed.off_clock)."""
    seconds, self.rollout_seconds = self.rollout_seconds, 0.0
    return seconds

  def __iter__(self):
    return self

  def __next__(self):
    if not self.buffer:
      self._rollout()
    return self.buffer.pop(0)

  def _rollout(self):
    cfg, r = self.cfg, self.cfg.rl
    state = self.current()
    # The clock starts once the policy's last update is done: that was the train step's time.
    jax.block_until_ready(state.params)
    t0 = time.perf_counter()
    batch = next(self.prompts)
    g = self.group_size
    prompt_ids = [p for p in batch["prompt_ids"] for _ in range(g)]
    texts = [t for t in batch["prompts"] for _ in range(g)]
    gen = generate_with_stats(
        self.model_cfg, self.to_policy(state.params, state.frozen), prompt_ids,
        max_new_tokens=r.max_new_tokens, sampling=SamplingParams(temperature=r.temperature),
        eos_ids=self.formatter.eos_ids, seed=cfg.seed * 7919 + self.count,
        return_logprobs=True)
    completions = gen.tokens
    stopped = np.array([bool(c) and c[-1] in self.formatter.eos_ids for c in completions])
    scores = self.scorer(texts, prompt_ids, completions)
    shaped = scores + np.where(stopped, 0.0, r.no_eos_penalty).astype(np.float32)
    rows = rows_of(prompt_ids, completions, cfg.data.seq_len)
    arrays, metrics = self.prepare(state.params, state.frozen, rows, shaped,
                                   np.float32(self.kl_coef))
    arrays, metrics = jax.device_get((arrays, metrics))
    # The sampler's log-probs against the trainer's for the same tokens: they should agree.
    sampled = np.zeros_like(rows["mask"])
    for i, (p, lp) in enumerate(zip(prompt_ids, gen.logprobs)):
      sampled[i, len(p) - 1:len(p) - 1 + len(lp)] = lp[:cfg.data.seq_len - len(p) + 1]
    gap = np.abs(sampled - arrays["old_logp"]) * rows["mask"]
    n = len(prompt_ids)
    seconds = time.perf_counter() - t0
    self.rollout_seconds += seconds
    self.metrics = {"score": float(scores.mean()), "score_std": float(scores.std()),
                    "completion_len": float(rows["mask"].sum(1).mean()),
                    "stopped": float(stopped.mean()), "kl_coef": self.kl_coef,
                    "logprob_gap": float(gap.max()),
                    # Seconds of the whole rollout (sampling, scoring and the log-probs and
                    # advantages the step needs), off the train step's clock, and its rate.
                    "rollout_s": seconds,
                    "rollout_tokens_per_s": sum(len(c) for c in completions) / seconds,
                    **{k: float(v) for k, v in metrics.items()}}
    if r.kl_target > 0:  # Ziegler et al. 2019, adaptive KL controller
      self.kl_coef = objectives.adaptive_kl_coef(self.kl_coef, self.metrics["kl"],
                                                 target=r.kl_target, horizon=r.kl_horizon,
                                                 n_steps=n)
    rng = np.random.default_rng([cfg.seed, self.count])
    data = {**rows, **arrays}
    b = cfg.train.batch_size
    for _ in range(r.epochs):
      order = rng.permutation(n)
      for start in range(0, n, b):
        idx = order[start:start + b]
        self.buffer.append({k: v[idx] for k, v in data.items()})
    self.count += 1

  def get_state(self) -> dict:
    return {"prompts": self.prompts.get_state(), "kl_coef": self.kl_coef, "count": self.count}

  def set_state(self, state: dict) -> None:
    self.prompts.set_state(state["prompts"])
    self.kl_coef, self.count = float(state["kl_coef"]), int(state["count"])
    self.buffer = []

  @property
  def stats(self) -> dict:
    return self.prompts.stats

  def close(self) -> None:
    self.prompts.close()


def sequence_kl(logp_BT, ref_logp_BT, mask_BT):
  """Per-sequence summed k1 KL, averaged over the batch (the reported "kl")."""
  return jnp.mean(jnp.sum((logp_BT - ref_logp_BT) * mask_BT, axis=1))


def trainer_logprobs(model, params, rows, temperature, *, chunk: int = head.DEFAULT_CHUNK):
  """(log-probs of the targets at `temperature`, entropy): f32[N, T] each, `chunk`
  (train.loss_chunk) tokens of logits at a time."""
  scores = pretrain.score_targets(model, params, rows, chunk=chunk, temperature=temperature,
                                  entropy=True)
  return scores.logp, scores.entropy


def feed(cfg, model_cfg, run, formatter, rollouts: Rollouts, to_policy, load_frozen):
  """The Feed of an RL task: rollouts to train on; greedy answers to rl.eval_prompts (default
  the validation prompt files) scored by the same source to evaluate."""
  files = common.eval_prompt_files(cfg) or run.val_files
  evaluate = common.ScoreEval(cfg, model_cfg, formatter, files, to_policy,
                              scorer=rollouts.scorer)
  return Feed(train=rollouts, evaluate=evaluate, load_frozen=load_frozen,
              host_metrics=lambda: rollouts.metrics, off_clock=rollouts.take_rollout_seconds,
              sample_prompt=lambda text: (formatter.prompt({"prompt": text}),
                                          formatter.eos_ids))
