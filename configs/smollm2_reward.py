"""The post-training ladder's reward rung for SmolLM2-135M-Instruct (see configs/ladder.py).

python train/main.py --config configs/smollm2_reward.py
"""

from configs import ladder


def get_config():
  c = ladder.smollm2("reward")
  return c
