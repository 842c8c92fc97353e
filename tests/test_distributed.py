"""Two processes on localhost with jax.distributed train exactly like one process, each reading
only its own data streams, and their checkpoint resumes in one process."""

import os
import shutil
import subprocess

import portpicker
import pytest

from tests.test_main import ROOT, command, corpus, env, losses, run  # noqa: F401  (fixture)

STEPS = ["--config.train.steps=4", "--config.checkpoint.every=2", "--config.train.eval_every=2"]


def test_two_processes_match_one(corpus, tmp_path):  # noqa: F811
  single = tmp_path / "single"
  e = env()
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # the same (2, 1, 1) mesh
  result = subprocess.run(command(single, corpus, *STEPS), capture_output=True, text=True,
                          timeout=300, env=e, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]

  multi = tmp_path / "multi"
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      command(multi, corpus, *STEPS,
              f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
      env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "'data': 2" in outs[0]  # one mesh over both processes' devices
  expected, got = losses(single), losses(multi)
  assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-6)

  # The step-2 checkpoint of the two processes holds both hosts' data streams (merged): one
  # process resumes from it with the batches the two would have read next.
  resumed = tmp_path / "resumed"
  shutil.copytree(multi, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  os.remove(resumed / "metrics.jsonl")
  result = subprocess.run(command(resumed, corpus, *STEPS), capture_output=True, text=True,
                          timeout=300, env=e, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from" in result.stdout
  got = losses(resumed)
  assert sorted(got) == [3, 4]
  for step in got:
    assert got[step] == pytest.approx(expected[step], rel=1e-6)
