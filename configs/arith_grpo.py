"""GRPO from the SFT run, rewarded by the answer checker train.examples.arithmetic:reward
(see configs/ladder.py): 8 prompts x 8 completions per rollout, 2 steps each.

python train/main.py --config configs/arith_grpo.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("grpo")
  c.train.steps = 150
  c.train.lr = 2e-5
  c.rl.prompts_per_rollout = 8
  c.rl.group_size = 8
  c.rl.epochs = 1
  c.rl.kl_coef = 0.04
  return c
