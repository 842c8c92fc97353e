"""The post-training ladder's sft rung on the arithmetic example (see configs/ladder.py).

python train/main.py --config configs/arith_sft.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("sft")
  return c
