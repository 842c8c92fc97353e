"""train/main.py as a user runs it: resume after kill -9, SIGTERM, bad input, dry run.

Each test starts the real program in a subprocess on a small corpus and model.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.model.vocab_size=512", "--config.model.d_model=64", "--config.model.n_layers=2",
    "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.d_ff=128",
    "--config.data.seq_len=64", "--config.data.tokenizer_train_mb=0.3",
    "--config.train.batch_size=4", "--config.train.eval_batches=2",
    "--config.train.warmup_steps=2", "--config.train.log_every=1",
    "--config.sample.max_new_tokens=0", "--config.metrics.peak_tflops=1",
    "--config.metrics.tensorboard=False",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Forty standard-library files: real Python, small enough to tokenize in a moment."""
  src = sysconfig.get_paths()["stdlib"]
  out = tmp_path_factory.mktemp("corpus")
  names = sorted(n for n in os.listdir(src) if n.endswith(".py"))[:40]
  for n in names:
    shutil.copy(os.path.join(src, n), out / n)
  return str(out)


def command(workdir, corpus, *extra):
  return [sys.executable, os.path.join(ROOT, "train", "main.py"), "--config",
          os.path.join(ROOT, "configs", "tiny.py"), f"--config.workdir={workdir}",
          f"--config.data.corpus={corpus}/*.py", *SMALL, *extra]


def env():
  e = dict(os.environ)
  e.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop has
  e["PYTHONUNBUFFERED"] = "1"
  return e


def run(cmd, timeout=300):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)


def losses(workdir) -> dict[int, float]:
  """step -> loss, the last line written for a step winning (a rerun rewrites steps)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out[row["step"]] = row["loss"]
  return out


def checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def tree_digest(path) -> str:
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(p.encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def test_resume_after_kill_9_repeats_the_same_losses(corpus, tmp_path):
  # Larger steps so that there is time to kill the run between checkpoints.
  slow = ["--config.train.steps=20", "--config.checkpoint.every=10",
          "--config.train.eval_every=0", "--config.data.seq_len=256",
          "--config.model.d_model=128", "--config.train.batch_size=8"]
  straight = tmp_path / "straight"
  result = run(command(straight, corpus, *slow))
  assert result.returncode == 0, result.stderr[-3000:]

  killed = tmp_path / "killed"
  proc = subprocess.Popen(command(killed, corpus, *slow), env=env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while 10 not in checkpoint_steps(killed) and time.time() < deadline:
    assert proc.poll() is None, "the run ended before its first checkpoint"
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert checkpoint_steps(killed)[-1] == 10

  result = run(command(killed, corpus, *slow))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from" in result.stdout
  expected, got = losses(straight), losses(killed)
  assert [got[s] for s in range(11, 21)] == [expected[s] for s in range(11, 21)]


def test_sigterm_saves_the_last_completed_step_and_exits_0(corpus, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(command(workdir, corpus, "--config.train.steps=100000",
                                  "--config.checkpoint.every=100000",
                                  "--config.train.eval_every=0"),
                          env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.exists(workdir / "metrics.jsonl") and len(losses(workdir)) >= 3:
      break
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  steps = checkpoint_steps(workdir)
  assert len(steps) == 1 and steps[0] >= 3
  assert max(losses(workdir)) <= steps[0]  # nothing was trained past the saved step
  # The checkpoint is whole: the same command resumes from it.
  result = run(command(workdir, corpus, f"--config.train.steps={steps[0] + 1}"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from" in result.stdout and checkpoint_steps(workdir)[-1] == steps[0] + 1


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  result = run(command(workdir, corpus, "--config.train.steps=2"))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _assert_untouched(workdir, fn):
  before = tree_digest(workdir / "checkpoints"), (workdir / "config.json").read_text()
  result = fn()
  assert (tree_digest(workdir / "checkpoints"), (workdir / "config.json").read_text()) == before
  return result


def test_unknown_config_key_lists_the_valid_ones(corpus, trained):
  result = _assert_untouched(trained, lambda: run(command(trained, corpus,
                                                          "--config.train.stpes=3")))
  assert result.returncode == 2
  assert "config.train.stpes" in result.stderr and "steps" in result.stderr
  assert "Valid keys in config.train" in result.stderr


def test_glob_matching_nothing_names_the_key(corpus, trained, tmp_path):
  result = _assert_untouched(trained, lambda: run(
      command(trained, corpus, f"--config.data.corpus={tmp_path}/nothing/*.txt")))
  assert result.returncode == 2
  assert "data.corpus" in result.stderr and "nothing" in result.stderr


@pytest.mark.parametrize("line,why", [("{not json", "JSON"), ('{"body": "x"}', "text")])
def test_bad_jsonl_line_names_file_and_line(trained, tmp_path, line, why):
  data = tmp_path / "data"
  data.mkdir()
  for i in range(3):
    rows = [json.dumps({"text": f"def f{i}_{j}():\n    return {j}\n"}) for j in range(5)]
    if i == 1:
      rows[3] = line
    (data / f"part{i}.jsonl").write_text("\n".join(rows) + "\n")
  result = _assert_untouched(trained, lambda: run(
      command(trained, "unused", f"--config.data.corpus={data}/*.jsonl",
              "--config.data.format=jsonl", "--config.data.val_fraction=0.34")))
  assert result.returncode == 2, result.stderr[-2000:]
  assert "part1.jsonl:4" in result.stderr and why in result.stderr


def test_seq_len_longer_than_the_model_takes(corpus, trained):
  result = _assert_untouched(trained, lambda: run(command(
      trained, corpus, "--config.data.seq_len=4096", "--config.model.max_seq_len=1024")))
  assert result.returncode == 2
  assert "data.seq_len=4096" in result.stderr and "model.max_seq_len=1024" in result.stderr


def test_dry_run_compiles_llama3_8b_shapes_without_allocating():
  # Two of the 32 layers keep the compile quick; memory scales per layer from here.
  result = run([sys.executable, os.path.join(ROOT, "train", "main.py"), "--config",
                os.path.join(ROOT, "configs", "llama3_8b.py"), "--dry_run",
                "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
                "--config.model.n_layers=2", "--config.data.seq_len=1024",
                "--config.train.batch_size=16"], timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert "XLA:CPU's estimates" in result.stdout and report["compiler"] == "cpu-simulated"
  assert report["devices"] == 16 and report["fits"] is None
  n = report["params"]
  # embedding + head + 2 layers of Llama-3-8B
  per_layer = 4096 * (4096 * 2 + 1024 * 2) + 3 * 4096 * 14336 + 2 * 4096
  assert n == 2 * 128256 * 4096 + 2 * per_layer + 4096
  # f32 params split over fsdp x tensor = 8 ways (replicated over data), Adam's two moments
  # likewise; the norm scales are replicated, a rounding error at this size.
  assert abs(report["param_bytes_per_device"] - 4 * n / 8) / (4 * n / 8) < 0.01
  assert abs(report["optimizer_bytes_per_device"] - 8 * n / 8) / (8 * n / 8) < 0.01
  assert report["temp_bytes_per_device"] > 0 and report["xla_flops_per_device"] > 0


@pytest.mark.parametrize("args,message", [
    (["--dry_run", "--target", "v5p-100"], "v5p-128"),  # names the known targets
    (["--target", "v5p-128"], "--target is for --dry_run"),
])
def test_bad_target_is_one_line_and_exit_2(args, message):
  result = run([sys.executable, os.path.join(ROOT, "train", "main.py"), "--config",
                os.path.join(ROOT, "configs", "llama3_8b.py"), *args], timeout=120)
  assert result.returncode == 2 and message in result.stderr
  assert "Traceback" not in result.stderr


def test_another_architecture_in_the_workdir_is_refused(corpus, trained):
  result = _assert_untouched(trained, lambda: run(command(
      trained, corpus, "--config.model.d_model=128", "--config.train.steps=3",
      "--config.train.warmup_steps=10")))
  assert result.returncode == 2, result.stderr[-3000:]
  assert "another architecture (model.d_model=128 here but 64 there" in result.stderr
  assert "train.warmup_steps=10 >= train.steps=3" in result.stderr  # a warning, first
  assert "Traceback" not in result.stderr


def test_unreadable_checkpoint_and_nonfinite_steps(corpus, trained, tmp_path):
  """A truncated checkpoint file: one line naming the step and the file, and the run resumes
  from the step before, deleting nothing. A step with an inf update: train.on_nonfinite=stop
  stops without saving it; skip goes on without applying it."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  every = "--config.checkpoint.every=1"
  assert run(command(workdir, corpus, "--config.train.steps=3", every)).returncode == 0
  assert checkpoint_steps(workdir) == [2, 3]
  data = workdir / "checkpoints/3/params/ocdbt.process_0/d"
  biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
  os.truncate(biggest, 100)

  # lr = 1e39 is inf in float32: step 3's update is not finite.
  result = run(command(workdir, corpus, "--config.train.steps=4", every,
                       "--config.train.lr=1e39"))
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if "cannot be read" in l]
  assert len(lines) == 1 and "checkpoint step 3 cannot be read" in lines[0]
  assert "checkpoints/3/params" in lines[0] and "3.unreadable" in lines[0]
  assert f"resumed from {workdir}/checkpoints/2" in result.stdout
  assert "error: step 3: the loss, gradient or update is not finite" in result.stderr
  assert "step 2, is the last good state" in result.stderr
  at = result.stderr.find("Traceback")
  assert at < 0, result.stderr[max(0, at - 1500):at + 1500]
  assert checkpoint_steps(workdir) == [2]  # nothing saved past the good step
  assert biggest.relative_to(workdir / "checkpoints/3").parts  # the bad one set aside, whole
  assert (workdir / "checkpoints/3.unreadable" / biggest.relative_to(
      workdir / "checkpoints/3")).stat().st_size == 100

  result = run(command(workdir, corpus, "--config.train.steps=4", every,
                       "--config.train.lr=1e39", "--config.train.on_nonfinite=skip"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "2 step(s) skipped" in result.stdout
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["step"] == 4 and rows[-1]["skipped_steps"] == 2
  assert all(math.isfinite(r["loss"]) for r in rows)


def _tfrecords(path):
  """The records of a TFRecord file (TensorBoard's event files): length, crc, data, crc."""
  import struct
  data, pos = open(path, "rb").read(), 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    yield data[pos + 12:pos + 12 + n]
    pos += 12 + n + 4


def _wandb_records(path):
  """The protobuf records of an offline W&B run file: a 7-byte header, then LevelDB's log
  format (32 KiB blocks of chunks: crc32, length, type (1 full, 2 first, 3 middle, 4 last))."""
  import struct
  from wandb.proto import wandb_internal_pb2
  data, pos, chunks = open(path, "rb").read(), 7, b""
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:
      pos += 32768 - pos % 32768
      continue
    _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if n == 0 and kind == 0:
      break
    chunks += data[pos + 7:pos + 7 + n]
    pos += 7 + n
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunks)
      chunks = b""
      yield record


def test_run_shows_progress_and_tracks_it(corpus, tmp_path):
  """Not on a terminal: a compile line and a plain line per logged step. TensorBoard gets the
  hparams and the sample, W&B (offline) the same rows as metrics.jsonl, and profile.* a
  jax.profiler trace."""
  pytest.importorskip("wandb")
  workdir = tmp_path / "run"
  e = {**env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
  result = subprocess.run(command(
      workdir, corpus, "--config.train.steps=3", "--config.metrics.tensorboard=True",
      "--config.metrics.wandb_project=jaxllm-test", "--config.profile.start_step=1",
      "--config.profile.steps=1", "--config.sample.max_new_tokens=4"),
      capture_output=True, text=True, timeout=300, env=e, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "compiling the train step..." in out and "compiled and ran the first step in" in out
  assert "step 3/3 | loss " in out and "| val_loss " in out and "| lr " in out
  assert "profile of steps 2..2" in out
  assert list(workdir.glob("profile/plugins/profile/*/*.xplane.pb"))

  from tensorboardX.proto import event_pb2
  tags = set()
  for f in workdir.glob("tb/events.out.tfevents.*"):
    for rec in _tfrecords(f):
      event = event_pb2.Event()
      event.ParseFromString(rec)
      tags |= {v.tag for v in event.summary.value}
  assert {"loss", "sample/text_summary", "_hparams_/experiment"} <= tags, tags

  rows = {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl"))}
  [run_file] = workdir.glob("wandb/offline-run-*/run-*.wandb")
  history, summary = {}, {}
  for record in _wandb_records(run_file):
    kind = record.WhichOneof("record_type")
    items = (record.history.item if kind == "history" else record.summary.update
             if kind == "summary" else [])
    values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
    if kind == "history":
      history[values["_step"]] = values
    elif kind == "summary":
      summary.update(values)
  assert sorted(history) == sorted(rows)
  for step, row in rows.items():
    assert history[step]["loss"] == pytest.approx(row["loss"])
  assert summary["sample"].startswith("def ")
  assert (workdir / "wandb_id").read_text().strip() in run_file.name


@pytest.mark.parametrize("extra,message", [
    (["--config.train.init_from={tmp}/nothing_here"],
     "config error: train.init_from='{tmp}/nothing_here': {tmp}/nothing_here/config.json not found"),
    (["--config.data.tokenizer={trained}/tokenizer.json", "--config.model.vocab_size=300"],
     "data error: the tokenizer of data.tokenizer='{trained}/tokenizer.json' has 512 tokens but "
     "model.vocab_size=300"),
])
def test_expected_failures_are_one_line_and_exit_2(corpus, trained, tmp_path, extra, message):
  workdir = tmp_path / "run"
  fill = lambda s: s.format(tmp=tmp_path, trained=trained)
  result = run(command(workdir, corpus, "--config.train.steps=2", *map(fill, extra)))
  assert result.returncode == 2, result.stderr[-3000:]
  assert fill(message) in result.stderr
  assert "Traceback (most recent call last):\n  File \"" + ROOT not in result.stderr
  assert not workdir.exists() or not any(workdir.iterdir())  # nothing written
