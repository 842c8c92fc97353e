"""Train a model: `python train/main.py --config configs/tiny.py [--config.a.b=value ...]`.

  --dry_run      compile the full train step for the configured mesh, allocate nothing, and
                 print memory per device; with --target NAME (v5p-128, v5e-16, 2xv5p-128,
                 h100-8, h100-8x4, ...) the real TPU/GPU compiler builds it for that hardware
                 and says whether it fits; without, simulated CPU devices give estimates.
Multi-host: set distributed.coordinator_address / num_processes / process_id (or the
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables); on a
TPU pod or under SLURM they are detected. Run the same command on every host.
"""

import argparse
import math
import os
import sys

if __package__ in (None, ""):  # `python train/main.py`: make the repo importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.config import ConfigError, load_config, split_overrides  # noqa: E402  (no jax yet)


def init_distributed(dcfg) -> None:
  """jax.distributed.initialize when this is a multi-process job; a no-op otherwise."""
  import jax
  env = os.environ
  address = dcfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  num = dcfg.num_processes or int(env.get("JAX_NUM_PROCESSES", "0"))
  pid = dcfg.process_id if dcfg.process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1"))
  if address:
    jax.distributed.initialize(coordinator_address=address, num_processes=num or None,
                               process_id=pid if pid >= 0 else None)
  elif "," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()  # TPU pod slices and SLURM describe the cluster themselves


def _simulate_devices_for(cfg) -> None:
  """For --dry_run: enough simulated CPU devices for the configured mesh (before jax loads)."""
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor]
  if any(s == -1 for s in sizes):
    raise ConfigError("--dry_run needs explicit mesh sizes: set mesh.data, mesh.fsdp, "
                      "mesh.expert and mesh.tensor (none of them -1)")
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={math.prod(sizes)}"
  os.environ["JAX_PLATFORMS"] = "cpu"


def _check_target(name: str) -> None:
  """A known target whose compiler is installed; jax itself stays on the CPU (before it loads)."""
  from train import accelerators
  try:
    target = accelerators.parse_target(name)
  except ValueError as e:
    raise ConfigError(f"--target: {e}") from None
  missing = accelerators.compiler_available(target.compiler)
  if missing:
    raise ConfigError(f"--target {name}: {missing}")
  accelerators.prepare_environment()


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a configs/*.py file, or configs/x.py:ARG "
                      "(get_config's argument, e.g. configs/ladder.py:sft)")
  parser.add_argument("--dry_run", action="store_true",
                      help="compile the train step for the configured mesh; allocate nothing")
  parser.add_argument("--target", default="",
                      help="with --dry_run: compile for this TPU slice or GPU box (v5p-128, "
                           "v5e-16, 2xv5p-128, h100-8, h100-8x4, ...) with its real compiler")
  try:
    overrides, rest = split_overrides(argv)
    args = parser.parse_args(rest)
    cfg = load_config(args.config, overrides)
    if args.target and not args.dry_run:
      raise ConfigError("--target is for --dry_run (compile-only); a real run uses the "
                        "devices it runs on")
    if args.dry_run:
      if args.target:
        _check_target(args.target)
      else:
        _simulate_devices_for(cfg)
      from train.dry_run import dry_run
      dry_run(cfg, args.target)
      return 0
    init_distributed(cfg.distributed)
    from train.loop import train
    train(cfg)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    from train.loop import NonFiniteError
    if not isinstance(e, NonFiniteError):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:
    from train.data import DataError
    if not isinstance(e, DataError):
      raise
    print(f"data error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
