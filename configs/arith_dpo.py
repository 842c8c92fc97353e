"""The post-training ladder's dpo rung on the arithmetic example (see configs/ladder.py).

python train/main.py --config configs/arith_dpo.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("dpo")
  return c
