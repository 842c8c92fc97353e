"""The post-training ladder's first rung: SFT from scratch on the arithmetic example (see
configs/ladder.py). About a minute on 2 CPU cores; writes runs/arith_data on first use.

python train/main.py --config configs/arith_sft.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("sft")
  c.train.steps = 1200
  c.train.lr = 3e-3
  c.train.eval_every = 200
  return c
