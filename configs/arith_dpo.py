"""DPO on the arithmetic example's right-vs-wrong answer pairs, from (and against) the SFT run
(see configs/ladder.py).

python train/main.py --config configs/arith_dpo.py
"""

from configs import ladder


def get_config():
  c = ladder.tiny("dpo")
  c.train.steps = 200
  c.train.lr = 1e-5
  c.dpo.beta = 0.1
  return c
