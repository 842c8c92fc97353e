"""The post-training ladder end to end on the shipped arithmetic example: SFT from scratch,
then reward model, DPO (and with a precomputed reference), PPO and GRPO from it, a few steps
each through train.loop.train with the shipped configs (a smaller model, for time)."""

import json
import math
import os

import pytest

from train.config import load_config
from train.loop import train

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SMALL = {"model.d_model": "64", "model.n_layers": "2", "model.d_ff": "128",
         "train.eval_batches": "2", "rl.eval_samples": "8", "sample.max_new_tokens": "4",
         "metrics.tensorboard": "False", "checkpoint.async_save": "False"}


def run(task: str, steps: int, **overrides):
  cfg = load_config(os.path.join(CONFIGS, f"ladder.py:{task}"),
                    {**SMALL, "train.steps": str(steps), "train.eval_every": str(steps),
                     **overrides})
  last = train(cfg)
  with open(os.path.join(cfg.workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return last, lines


@pytest.fixture(scope="module")
def ladder_dir(tmp_path_factory):
  """A directory where runs/arith_data and runs/arith_sft exist (the configs' paths)."""
  root = tmp_path_factory.mktemp("ladder")
  old = os.getcwd()
  os.chdir(root)
  try:
    last, lines = run("sft", 4)
    yield root, last, lines
  finally:
    os.chdir(old)


@pytest.fixture
def in_ladder(ladder_dir):
  old = os.getcwd()
  os.chdir(ladder_dir[0])
  yield
  os.chdir(old)


def test_sft_generates_its_data_and_trains(ladder_dir):
  root, last, lines = ladder_dir
  assert os.path.isfile(root / "runs/arith_data/sft_train.jsonl")
  assert os.path.isdir(root / "runs/arith_sft/checkpoints/4")
  assert math.isfinite(last["loss"]) and "val_loss" in last and "val_score" in last
  assert 0.0 <= last["val_score"] <= 1.0
  assert "sample" in last


def test_reward_rung(in_ladder):
  last, _ = run("reward", 3)
  assert math.isfinite(last["loss"])
  assert 0 <= last["val_accuracy"] <= 1 and "val_margin" in last


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_rung(in_ladder, precompute):
  last, _ = run("dpo", 3, **{"dpo.precompute_reference": str(precompute),
                                 "workdir": f"runs/arith_dpo_{precompute}"})
  assert math.isfinite(last["loss"]) and "rewards/margins" in last and "val_score" in last


ROLLOUT_SLEEP_S = 4.0


def slow_reward(prompt: str, completion: str) -> float:
  """The arithmetic checker, slowed so that scoring a rollout of 8 rows takes 4 s more."""
  import time
  from train.examples import arithmetic
  time.sleep(ROLLOUT_SLEEP_S / 8)
  return arithmetic.reward(prompt, completion)


@pytest.mark.parametrize("task", ["ppo", "grpo"])
def test_rl_rungs(in_ladder, task):
  # One rollout of 8 rows per step (PPO: 8 prompts; GRPO: 4 prompts x 2), scored slowly.
  last, lines = run(task, 2, **{"rl.prompts_per_rollout": "8" if task == "ppo" else "4",
                                "train.batch_size": "8", "rl.group_size": "2",
                                "rl.epochs": "1", "train.log_every": "1",
                                "rl.reward_fn": "tests.test_ladder:slow_reward"})
  assert math.isfinite(last["loss"]) and 0 <= last["score"] <= 1
  assert "kl" in last and "val_score" in last
  # The rollout is off the train step's clock: were it on, step 2's tokens_per_s could not
  # exceed 8 rows x 64 tokens / 4 s (a bound with room for a slow step on a busy machine; the
  # arithmetic of the exclusion is tests/test_mfu.py's, with a fake clock). Rollouts report
  # their own time and rate (<= 16 tokens a row).
  assert [line["step"] for line in lines if "tokens_per_s" in line] == [2]  # 1 compiles
  assert last["rollout_s"] >= ROLLOUT_SLEEP_S
  assert last["tokens_per_s"] > 8 * 64 / ROLLOUT_SLEEP_S and "mfu" in last
  assert 0 < last["rollout_tokens_per_s"] < 8 * 16 / ROLLOUT_SLEEP_S
  # Sampler and trainer agree on the log-probs of the sampled tokens.
  assert last["logprob_gap"] < 1e-3
  # The exported policy is a plain model: generation reads the workdir as it is.
  from infer import workdir as run_dir
  params = run_dir.load_params(f"runs/arith_{task}")
  assert "embedding" in params


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_lora_rungs_export_merged_models(in_ladder, task):
  import jax
  import numpy as np
  from infer import workdir as run_dir
  workdir = f"runs/arith_{task}_lora"
  last, _ = run(task, 3, **{"lora.rank": "4", "lora.targets": "q,v,down",
                            "train.init_from": "runs/arith_sft", "workdir": workdir,
                            "train.lr": "1e-2"})
  assert math.isfinite(last["loss"])
  base, merged = run_dir.load_params("runs/arith_sft"), run_dir.load_params(workdir)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), merged, base)
  # Only the adapted projections moved; everything else is the base, bit for bit.
  assert changed["layers"]["attn"]["q"] and changed["layers"]["mlp"]["down"]
  assert not changed["layers"]["attn"]["k"] and not changed["embedding"]


def test_rl_resumes_from_its_checkpoint(in_ladder, capsys):
  overrides = {"rl.prompts_per_rollout": "8", "train.batch_size": "8", "rl.epochs": "1",
               "workdir": "runs/arith_ppo_resume", "rl.kl_target": "0.01"}
  run("ppo", 1, **overrides)
  last, lines = run("ppo", 2, **overrides)
  assert "resumed from" in capsys.readouterr().out
  assert [line["step"] for line in lines] == [1, 2] and math.isfinite(last["loss"])


def test_ppo_scored_by_a_reward_model(in_ladder):
  # The critic starts from the reward model too (rl.value_init defaults to rl.reward_model).
  run("reward", 2, workdir="runs/arith_rm_for_ppo")
  last, _ = run("ppo", 2, **{"rl.reward_fn": "", "rl.reward_model": "runs/arith_rm_for_ppo",
                             "rl.prompts_per_rollout": "8", "train.batch_size": "8",
                             "rl.epochs": "1", "workdir": "runs/arith_ppo_rm"})
  assert math.isfinite(last["loss"]) and math.isfinite(last["score"])
  assert math.isfinite(last["val_score"]) and last["logprob_gap"] < 1e-3
