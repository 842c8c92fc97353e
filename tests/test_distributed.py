"""Two processes on localhost with jax.distributed: they train exactly like one process, each
reading only its own data streams; their checkpoint resumes in one process; and they stop
together on a SIGTERM to either."""

import os
import shutil
import signal
import subprocess
import time

import portpicker
import pytest

from tests.test_main import ROOT, checkpoint_steps, command, corpus, env, losses  # noqa: F401

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


def test_sigterm_to_one_process_saves_both_at_the_same_step(corpus, tmp_path):  # noqa: F811
  """JAX's preemption service (on with jax.distributed) carries a SIGTERM on process 1 to
  process 0: both save the same step and exit 0, with no per-step host sync to find out."""
  workdir = tmp_path / "run"
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      command(workdir, corpus, "--config.train.steps=100000", "--config.train.eval_every=0",
              "--config.checkpoint.every=100000",
              "--config.checkpoint.preemption_check_every=100000",  # only the service acts
              f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
      env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  deadline = time.time() + 300
  while not (os.path.exists(workdir / "metrics.jsonl") and len(losses(workdir)) >= 3):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  saved = [int(out.split("preemption notice: all processes save at step ")[1].split()[0])
           for out in outs]
  assert saved[0] == saved[1] >= 3
  assert checkpoint_steps(workdir) == [saved[0]]
  assert max(losses(workdir)) <= saved[0]  # nothing was trained past the saved step
