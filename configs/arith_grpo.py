"""The post-training ladder's grpo rung on the arithmetic example (see configs/ladder.py).

python train/main.py --config configs/arith_grpo.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("grpo")
  return c
