"""The post-training ladder's grpo rung for SmolLM2-135M-Instruct (see configs/ladder.py).

python train/main.py --config configs/smollm2_grpo.py
"""

from configs import ladder


def get_config():
  c = ladder.smollm2("grpo")
  return c
