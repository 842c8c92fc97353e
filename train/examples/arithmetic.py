"""Arithmetic word problems: the post-training ladder's worked example.

    "Mia has 23 apples. She gets 15 more. How many apples does she have now?"
    -> " 23 + 15 = 38"

Every answer can be checked by a function (`reward`), so one generator gives all the ladder
needs: SFT rows (prompt, completion), preference pairs (the right answer against a wrong
one), and prompts scored by `reward` for PPO and GRPO. Held-out problems are sentences
never trained on (unseen template, name and item combinations) over the same sums.

The SFT rows are demonstrations by a careless writer who, in CARELESS of the problems that
need a carry (17 + 8) or a borrow (23 - 7), forgets it (17 + 8 = 15, 23 - 7 = 26), as
human demonstrations carry their writers' habits. SFT imitates the habit, so its greedy
answers to those problems are wrong; the checker's reward (PPO, GRPO) and the pairs
(reward model, DPO: the right answer against the writer's usual mistake) are what teach
the carry. With careful demonstrations (CARELESS = 0) SFT's errors are sums it has not yet
learnt, and reinforcing its own samples did not beat more SFT (README, "Post-training").

    python -m train.examples.arithmetic runs/arith_data   # or: data.make in the configs
"""

import json
import os
import random
import re
import sys

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben")
ITEMS = ("apples", "coins", "books", "cards", "shells", "stamps")
# (template, operator): the numbers appear in the prompt in order a, b.
TEMPLATES = (
    ("{name} has {a} {item}. {name} gets {b} more. How many {item} now?", "+"),
    ("{name} has {a} {item} and finds {b} more. How many {item} in all?", "+"),
    ("{name} has {a} {item}. {name} gives away {b}. How many {item} are left?", "-"),
    ("{name} had {a} {item} and lost {b}. How many {item} are left?", "-"),
)
FILES = {"sft": 20000, "pairs": 8000, "prompts": 4000}
VAL_ROWS = 256
VOCAB_SIZE = 512
CARELESS = 0.6  # how often the SFT demonstrations forget a carry or a borrow


def solve(a: int, op: str, b: int) -> int:
  return a + b if op == "+" else a - b


def parse(prompt: str) -> tuple[int, str, int]:
  """(a, op, b) of a problem, read back from its text."""
  a, b = (int(x) for x in re.findall(r"\d+", prompt)[:2])
  op = "-" if re.search(r"gives away|lost", prompt) else "+"
  return a, op, b


def careless(a: int, op: str, b: int) -> int:
  """The answer with the carry or borrow of the units digit forgotten (= solve() if none)."""
  if op == "+":
    return a + b - 10 if a % 10 + b >= 10 else a + b
  return a - b + 10 if a % 10 < b else a - b


def answer_text(a: int, op: str, b: int, result: int) -> str:
  return f" {a} {op} {b} = {result}"


def reward(prompt: str, completion: str) -> float:
  """1.0 when the last number of the completion is the right answer, else 0.0."""
  a, op, b = parse(prompt)
  numbers = re.findall(r"-?\d+", completion)
  return float(bool(numbers) and int(numbers[-1]) == solve(a, op, b))


def _problem(rng: random.Random, held_out: bool):
  while True:
    t = rng.randrange(len(TEMPLATES))
    name, item = rng.randrange(len(NAMES)), rng.randrange(len(ITEMS))
    # Held-out problems use (template, name, item) combinations never trained on: new
    # sentences over the same small table of sums, which a tiny model can learn in minutes.
    if ((t * 7 + name * 3 + item) % 6 == 0) == held_out:
      break
  template, op = TEMPLATES[t]
  a, b = rng.randint(0, 20), rng.randint(0, 9)
  if op == "-" and b > a:
    a, b = b, a
  prompt = template.format(name=NAMES[name], item=ITEMS[item], a=a, b=b)
  return prompt, (a, op, b)


def _wrong(rng: random.Random, a: int, op: str, b: int) -> str:
  """A plausible wrong answer: the careless writer's (when it differs), else off by a
  little, or the other operation."""
  right = solve(a, op, b)
  if careless(a, op, b) != right:
    wrong = careless(a, op, b)
  elif rng.random() < 0.3:
    other = "-" if op == "+" else "+"
    wrong = solve(a, other, b)
  else:
    wrong = right + rng.choice((-10, -2, -1, 1, 2, 10))
  if wrong == right:
    wrong = right + 1
  return answer_text(a, op, b, wrong)


def rows(kind: str, n: int, seed: int, held_out: bool) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    prompt, (a, op, b) = _problem(rng, held_out)
    right = answer_text(a, op, b, solve(a, op, b))
    if kind == "sft":
      result = careless(a, op, b) if rng.random() < CARELESS else solve(a, op, b)
      out.append({"prompt": prompt, "completion": answer_text(a, op, b, result)})
    elif kind == "pairs":
      out.append({"prompt": prompt, "chosen": right, "rejected": _wrong(rng, a, op, b)})
    else:
      out.append({"prompt": prompt})
  return out


def tokenizer_for(texts):
  """Byte-level BPE with one token per digit: numbers are then read and written digit by
  digit, so the sums of unseen pairs can be worked out rather than looked up."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from train.tokenizer import EOS
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=VOCAB_SIZE, special_tokens=[EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tokenizer


def make(directory: str) -> None:
  """Writes {sft,pairs,prompts}_{train,val}.jsonl and a BPE tokenizer.json into directory."""
  os.makedirs(directory, exist_ok=True)
  # The tokenizer first: the train files are what marks the data as written.
  texts = [r["prompt"] + r["completion"] for r in rows("sft", 4000, seed=99, held_out=False)]
  tokenizer_for(texts).save(os.path.join(directory, "tokenizer.json"))
  for i, (kind, n) in enumerate(FILES.items()):
    for split, count, held_out in (("train", n, False), ("val", VAL_ROWS, True)):
      path = os.path.join(directory, f"{kind}_{split}.jsonl")
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        for row in rows(kind, count, seed=10 * i + held_out, held_out=held_out):
          f.write(json.dumps(row) + "\n")
      os.replace(tmp, path)


if __name__ == "__main__":
  make(sys.argv[1] if len(sys.argv) > 1 else "runs/arith_data")
