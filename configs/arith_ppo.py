"""The post-training ladder's ppo rung on the arithmetic example (see configs/ladder.py).

python train/main.py --config configs/arith_ppo.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("ppo")
  return c
