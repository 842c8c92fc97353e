"""Check that a config fits its mesh before paying for the pod.

Lowers and compiles the full train step with abstract arrays (ShapeDtypeStructs carrying the
real shardings) on simulated CPU devices, and prints per-device memory from XLA's memory
analysis and the step's FLOPs. Nothing the size of the model is allocated.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from train.loop import build_program, model_and_mesh, step_cost


def _bytes_per_device(tree, shardings) -> int:
  sizes = jax.tree.map(
      lambda x, s: int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize,
      tree, shardings)
  return int(sum(jax.tree.leaves(sizes)))


def dry_run(cfg) -> dict:
  model_cfg, mesh = model_and_mesh(cfg)
  prog = build_program(cfg, model_cfg, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       prog.abstract, prog.shardings)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=prog.batch_sharding)
           for k, (shape, dt) in prog.objective.batch_shapes(b, t).items()}
  t0 = time.perf_counter()
  lowered = prog.train_step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()

  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n_devices = mesh.size
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(prog.abstract.params))
  report = {
      "devices": n_devices,
      "mesh": dict(mesh.shape),
      "params": n_params,
      "param_bytes_per_device": _bytes_per_device(prog.abstract.params, prog.shardings.params),
      "optimizer_bytes_per_device": _bytes_per_device(prog.abstract.opt_state,
                                                      prog.shardings.opt_state),
      "argument_bytes_per_device": int(mem.argument_size_in_bytes),
      "output_bytes_per_device": int(mem.output_size_in_bytes),
      "alias_bytes_per_device": int(mem.alias_size_in_bytes),
      "temp_bytes_per_device": int(mem.temp_size_in_bytes),
      "peak_bytes_per_device_estimate": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                            - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
      "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
      "model_flops_per_step": step_cost(prog.objective, model_cfg, b, t).flops,
      "lower_s": round(t1 - t0, 2),
      "compile_s": round(t2 - t1, 2),
  }
  gib = 1024**3
  print(json.dumps(report, indent=2))
  print(f"per device: params {report['param_bytes_per_device'] / gib:.2f} GiB, optimizer "
        f"{report['optimizer_bytes_per_device'] / gib:.2f} GiB, temporaries "
        f"{report['temp_bytes_per_device'] / gib:.2f} GiB, peak ~"
        f"{report['peak_bytes_per_device_estimate'] / gib:.2f} GiB", flush=True)
  return report
