"""A reward model on the arithmetic example's right-vs-wrong answer pairs, from the SFT run's
backbone with a fresh scalar head (see configs/ladder.py).

python train/main.py --config configs/arith_reward.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("reward")
  c.train.steps = 300
  c.train.lr = 3e-4
  return c
