"""PPO from the SFT run, rewarded by the answer checker train.examples.arithmetic:reward
(see configs/ladder.py). Each rollout of 32 prompts gives rl.epochs x 32 / 32 = 2 steps.

python train/main.py --config configs/arith_ppo.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("ppo")
  c.train.steps = 150
  c.train.lr = 2e-5
  c.rl.prompts_per_rollout = 32
  c.rl.epochs = 2
  c.rl.kl_coef = 0.02
  return c
