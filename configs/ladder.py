"""The post-training ladder: one config per rung, `--config=configs/ladder.py:RUNG`.

Each rung is one run of train/main.py; the tiny ones take minutes on 2 CPU cores:
  sft     SFT from scratch on generated word problems (writes runs/arith_data first)
  reward  reward model from the SFT run       (needs runs/arith_sft)
  dpo     DPO from the SFT run                (needs runs/arith_sft)
  ppo     PPO from the SFT run, reward fn     (needs runs/arith_sft)
  grpo    GRPO from the SFT run, reward fn    (needs runs/arith_sft)
The same rungs for SmolLM2-135M-Instruct (converted first: README, "Pretrained weights") are
smollm2_sft, smollm2_reward, ... (workdirs runs/smollm2_<task>); a few steps run on CPU, the
defaults are for an accelerator.

  python train/main.py --config=configs/ladder.py:sft
  python train/main.py --config=configs/ladder.py:smollm2_dpo --config.train.steps=20
"""

from configs import base

DATA = "runs/arith_data"
KIND = {"sft": "sft", "reward": "pairs", "dpo": "pairs", "ppo": "prompts", "grpo": "prompts"}
REWARD_FN = "train.examples.arithmetic:reward"


def data(c, kind: str, directory: str = DATA) -> None:
  """Train and held-out files of the arithmetic example, written on first use."""
  c.data.corpus = f"{directory}/{kind}_train.jsonl"
  c.data.val_corpus = f"{directory}/{kind}_val.jsonl"
  c.data.make = "train.examples.arithmetic:make"
  c.rl.reward_fn = REWARD_FN
  c.rl.eval_prompts = f"{directory}/prompts_val.jsonl"  # held-out accuracy of greedy answers
  c.rl.eval_samples = 256
  c.rl.max_new_tokens = 16
  c.sample.prompt = "Mia has 17 coins. Mia gets 8 more. How many coins now?"
  c.sample.max_new_tokens = 16
  c.sample.temperature = 0.0


def tiny(task: str):
  """A 0.1M-parameter model on the arithmetic example: each rung takes minutes on a CPU."""
  c = base.get_config()
  c.task = task
  c.workdir = f"runs/arith_{task}"
  c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                 max_seq_len=128)
  data(c, KIND[task])
  c.data.tokenizer = f"{DATA}/tokenizer.json"
  c.data.seq_len = 64
  c.train.batch_size = 32
  c.train.warmup_steps = 10
  c.train.eval_every = 50
  c.train.eval_batches = 8
  c.checkpoint.every = 100
  c.model.value_head = task == "reward"
  if task != "sft":  # every later rung starts from the SFT run
    c.train.init_from = "runs/arith_sft"  # make it: python train/main.py --config=configs/ladder.py:sft
    c.train.decay = "constant"
    c.train.weight_decay = 0.0
  return c


def smollm2(task: str):
  """SmolLM2-135M-Instruct (converted: see README, "Pretrained weights") on the same example,
  with its chat template. A few steps run on CPU; the defaults are for an accelerator."""
  from configs import smollm2_135m
  c = smollm2_135m.get_config()
  c.task = task
  c.workdir = f"runs/smollm2_{task}"
  c.model.remat = "none"
  data(c, KIND[task])
  c.data.tokenizer = ""  # the converted model's, through train.init_from
  c.data.seq_len = 128
  c.train.batch_size = 16
  c.train.lr = 1e-5
  c.train.warmup_steps = 10
  c.train.steps = 200
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.rl.eval_samples = 64
  c.checkpoint.every = 100
  c.model.value_head = task == "reward"
  # Convert once (README, "Pretrained weights"): python train/convert.py --src gguf:<SmolLM2 .gguf> --dst orbax:runs/smollm2
  c.train.init_from = "runs/smollm2"
  if task in ("reward", "dpo", "ppo", "grpo"):
    c.train.init_from = "runs/smollm2_sft"  # make it: python train/main.py --config=configs/ladder.py:smollm2_sft
  return c


# Each tiny rung's own settings on top of tiny(task).
TINY_RUNGS = {
    "sft": {"train.steps": 1200, "train.lr": 3e-3, "train.eval_every": 200},
    "reward": {"train.steps": 300, "train.lr": 3e-4},
    "dpo": {"train.steps": 200, "train.lr": 1e-5, "dpo.beta": 0.1},
    "ppo": {"train.steps": 150, "train.lr": 2e-5, "rl.prompts_per_rollout": 32,
            "rl.epochs": 2, "rl.kl_coef": 0.02},
    "grpo": {"train.steps": 150, "train.lr": 2e-5, "rl.prompts_per_rollout": 8,
             "rl.group_size": 8, "rl.epochs": 1, "rl.kl_coef": 0.04},
}
RUNGS = (*TINY_RUNGS, *(f"smollm2_{task}" for task in TINY_RUNGS))


def get_config(rung: str):
  """RUNG: sft, reward, dpo, ppo, grpo (tiny) or smollm2_sft, ..., smollm2_grpo."""
  if rung not in RUNGS:
    from train.config import ConfigError
    raise ConfigError(f"configs/ladder.py has no rung {rung!r}; rungs: {', '.join(RUNGS)}")
  if rung.startswith("smollm2_"):
    return smollm2(rung.removeprefix("smollm2_"))
  c = tiny(rung)
  for dotted, value in TINY_RUNGS[rung].items():
    section, key = dotted.split(".")
    c[section][key] = value
  return c
