"""The post-training ladder's reward rung on the arithmetic example (see configs/ladder.py).

python train/main.py --config configs/arith_reward.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("reward")
  return c
