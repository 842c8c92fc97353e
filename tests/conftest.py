"""Test setup: 8 simulated CPU devices, so sharding tests run on any machine.

XLA_FLAGS must be set before jax is imported anywhere in the process.
"""

import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from train import accelerators  # noqa: E402  (imports no jax)

# jax on the CPU; the real TPU and GPU compilers load compile-only beside it, in every worker.
accelerators.prepare_environment()

import pytest  # noqa: E402


def pytest_configure(config):
  """One XLA compilation cache for the whole run, shared by the xdist workers and every
  subprocess they start (they inherit the environment): the many runs of the tiny model
  compile the same programs (on 2 cores, a quarter of the suite's time)."""
  if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  cache = tempfile.mkdtemp(prefix="jaxllm-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))


@pytest.fixture(scope="module")
def quick_compiles():
  """For modules of interpreted Pallas kernels: they become large XLA loops whose
  optimisation costs more than it saves here."""
  import jax
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def target_devices():
  """name -> compile-only devices of a named target ("v5e-4", "h100-8"; train/accelerators.py):
  the real TPU or GPU compiler builds for them here. Skips, saying why, where that compiler is
  not installed (the test extra installs both)."""
  def devices(name):
    target = accelerators.parse_target(name)
    missing = accelerators.compiler_available(target.compiler)
    if missing:
      pytest.skip(missing)
    return accelerators.target_devices(target)
  return devices
