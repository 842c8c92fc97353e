"""A run checkpointed on one mesh resumes on another (orbax restores onto the new shardings)."""

import json
import os

import pytest

from tests.test_main import SMALL, corpus  # noqa: F401  (fixture)
from train.config import load_config, split_overrides
from train.loop import train


def config(workdir, corpus_dir, mesh, steps):
  overrides, _ = split_overrides(SMALL + [
      f"--config.workdir={workdir}", f"--config.data.corpus={corpus_dir}/*.py",
      f"--config.train.steps={steps}", "--config.checkpoint.every=2",
      "--config.train.eval_every=0", "--config.checkpoint.async_save=False",
      "--config.train.batch_size=8",
      f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
      f"--config.mesh.tensor={mesh[2]}"])
  return load_config("configs/tiny.py", overrides)


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows}


def test_resume_on_another_mesh(corpus, tmp_path):  # noqa: F811
  straight, moved = tmp_path / "straight", tmp_path / "moved"
  train(config(straight, corpus, (1, 2, 4), 4))
  train(config(moved, corpus, (8, 1, 1), 2))  # checkpoint at step 2 on an (8, 1, 1) mesh ...
  train(config(moved, corpus, (1, 2, 4), 4))  # ... resumed on (1, 2, 4)
  a, b = losses(straight), losses(moved)
  for step in (3, 4):
    assert b[step] == pytest.approx(a[step], rel=1e-4)
