"""The post-training ladder's dpo rung for SmolLM2-135M-Instruct (see configs/ladder.py).

python train/main.py --config configs/smollm2_dpo.py
"""

from configs import ladder


def get_config():
  c = ladder.smollm2("dpo")
  return c
