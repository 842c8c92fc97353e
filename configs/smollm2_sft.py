"""The post-training ladder's sft rung for SmolLM2-135M-Instruct (see configs/ladder.py).

python train/main.py --config configs/smollm2_sft.py
"""

from configs import ladder


def get_config():
  c = ladder.smollm2("sft")
  return c
