"""Does this config fit, and on what? Compile the full train step and read the memory plan.

  python train/main.py --config configs/llama3_8b.py --dry_run --target v5p-128
  python train/main.py --config configs/llama3_8b.py --dry_run --target h100-8 \
      --config.mesh.fsdp=8

With `--target` the real compiler of that hardware builds the step for compile-only devices
of its topology (train/accelerators.py): XLA:TPU and Mosaic from libtpu, or XLA:GPU with
Triton and ptxas from the CUDA plugin. Its memory plan is that hardware's own answer; nothing
runs and nothing the size of the model is allocated. Without `--target` the step is compiled
for simulated CPU devices, whose memory figures are only estimates of an accelerator's.

Prints the per-device breakdown against the chip's memory, then one line of JSON.
"""

import json
import re
import time

import jax
import numpy as np

from model import quant
from model.config import ModelConfig
from model.moe import expert_impl
from pallas_kernels.paths import attention_path, grouped_matmul_path
from train import accelerators
from train.loop import build_program, model_and_mesh, step_cost

GIB = 1024**3
# XLA:TPU's refusal of a program larger than the chip's memory (sizes in GiB).
_TPU_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)G\) exceeds available "
                      r"HBM \(([\d.]+)G\)")


def _bytes_per_device(tree, shardings) -> int:
  sizes = jax.tree.map(
      lambda x, s: int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize,
      tree, shardings)
  return int(sum(jax.tree.leaves(sizes)))


def _size(tree) -> int:
  """Parameters of a tree, a quantized weight counted as the weight it stands for."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized))


def quantized_weights(tree) -> dict | None:
  """The tree's quantized weights (a QLoRA base: lora.base_quant): their kind, parameters and
  bytes over all devices, codes and scales together; None if it has none."""
  weights = [x for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized)
             if quant.is_quantized(x)]
  if not weights:
    return None
  nbytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(weights))
  params = sum(x.size for x in weights)
  return {"kind": ",".join(sorted({x.kind for x in weights})), "params": params,
          "bytes": nbytes, "bytes_per_param": nbytes / params}


def attention_choice(model_cfg: ModelConfig, devices) -> str:
  """What the train step's attention runs on these devices, in words (what it compiles)."""
  return str(attention_path(devices[0].platform, head_dim=model_cfg.head_dim,
                            dtype=model_cfg.compute_dtype, impl=model_cfg.attention_impl))


def experts_choice(model_cfg: ModelConfig, devices) -> str | None:
  """How the train step's MoE experts multiply on these devices, in words; None when dense."""
  if not model_cfg.n_experts:
    return None
  platform = devices[0].platform
  impl = expert_impl(model_cfg, platform)
  if impl == "dense":
    return "dense (every expert on every token)"
  dtype = model_cfg.compute_dtype
  path = grouped_matmul_path(platform, x_dtype=dtype, w_dtype=dtype,
                             impl="auto" if impl == "gmm" else "xla")
  return f"grouped matmul: {path}"


def dry_run(cfg, target: str = "") -> dict:
  """Compiles cfg's train step for `target` (a name from train/accelerators.py) or, when empty,
  for simulated CPU devices. Prints the report and returns it."""
  report, _ = plan(cfg, target)
  _print(report, accelerators.parse_target(target) if target else None)
  return report


def plan(cfg, target: str = ""):
  """(report, the compiled step or None where the compiler refused it for want of memory)."""
  tgt = accelerators.parse_target(target) if target else None
  devices = accelerators.target_devices(tgt) if tgt else None
  compiler = tgt.compiler if tgt else "cpu-simulated"
  model_cfg, mesh = model_and_mesh(cfg, devices)
  prog = build_program(cfg, model_cfg, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       prog.abstract, prog.shardings)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=prog.batch_sharding)
           for k, (shape, dt) in prog.objective.batch_shapes(b, t).items()}
  t0 = time.perf_counter()
  lowered = prog.train_step.lower(state, batch)
  t1 = time.perf_counter()
  hbm = tgt.chip.hbm_bytes if tgt else None
  try:
    compiled, refused = lowered.compile(), None
  except jax.errors.JaxRuntimeError as e:
    compiled = None
    # The TPU compiler refuses a program that cannot fit, saying how much it needs.
    refused = _TPU_OOM.search(str(e))
    if tgt is None or refused is None:
      raise
  t2 = time.perf_counter()

  if refused is None:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    # The compiler's own peak where it reports one (TPU, GPU); else the sum of its buffers.
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or planned)
    temp = int(mem.temp_size_in_bytes)
    # XLA:GPU's compiled cost analysis has no FLOP count (it reports 0): None, not a zero.
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    xla_flops = xla_flops or None
  else:
    peak, temp, xla_flops = int(float(refused.group(1)) * GIB), None, None
    hbm = int(float(refused.group(2)) * GIB)
  model_flops = step_cost(prog.objective, model_cfg, b, t).flops
  report = {
      "target": tgt.name if tgt else None,
      "compiler": compiler,
      "chip": tgt.chip.name if tgt else None,
      "devices": mesh.size,
      "mesh": dict(mesh.shape),
      "attention": attention_choice(model_cfg, mesh.devices.flat),
      "experts": experts_choice(model_cfg, mesh.devices.flat),
      "params": _size(prog.abstract.params),
      "param_bytes_per_device": _bytes_per_device(prog.abstract.params, prog.shardings.params),
      "optimizer_bytes_per_device": _bytes_per_device(prog.abstract.opt_state,
                                                      prog.shardings.opt_state),
      # What the step reads but does not train: LoRA's base, a DPO reference, a reward model.
      "frozen_params": _size(prog.abstract.frozen),
      "frozen_bytes_per_device": _bytes_per_device(prog.abstract.frozen,
                                                   prog.shardings.frozen),
      "frozen_quantized": quantized_weights(prog.abstract.frozen),
      "temp_bytes_per_device": temp,
      "peak_bytes_per_device": peak,
      "hbm_bytes_per_device": hbm,
      "fits": None if hbm is None else peak <= hbm,
      "xla_flops_per_device": xla_flops,
      "model_flops_per_step": model_flops,
      "lower_s": round(t1 - t0, 2),
      "compile_s": round(t2 - t1, 2),
  }
  if tgt:
    # A bound, not a measurement: the step cannot run faster than the chips' peak allows.
    report["min_step_s_at_peak"] = model_flops / (mesh.size * tgt.chip.bf16_tflops * 1e12)
  return report, compiled


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _print(r: dict, tgt) -> None:
  gib = lambda n: f"{n / GIB:8.2f} GiB"
  if tgt:
    head = (f"target {tgt.name}: {r['devices']} x {tgt.chip.name} "
            f"({tgt.chip.hbm_gib:g} GiB each), compiled by the real {r['compiler']} compiler "
            "(compile-only devices)")
  else:
    head = (f"{r['devices']} simulated CPU devices: these are XLA:CPU's estimates, not an "
            "accelerator's (pass --target, e.g. v5p-128 or h100-8, for the real compiler's)")
  experts = f" | experts: {r['experts']}" if r["experts"] else ""
  lines = [head, f"mesh {r['mesh']} | attention: {r['attention']}{experts}",
           f"compiled in {r['compile_s']:.1f} s (lowered in {r['lower_s']:.1f} s)",
           "per device:",
           f"  parameters   {gib(r['param_bytes_per_device'])}  ({_count(r['params'])} trained)"]
  if r["frozen_params"]:
    frozen = f"  frozen       {gib(r['frozen_bytes_per_device'])}  ({_count(r['frozen_params'])}"
    q = r["frozen_quantized"]
    if q:
      frozen += (f"; block matmuls {_count(q['params'])} in {q['kind']}: "
                 f"{q['bytes_per_param']:.3f} B/param with their scales")
    lines.append(frozen + ")")
  lines.append(f"  optimizer    {gib(r['optimizer_bytes_per_device'])}")
  if r["temp_bytes_per_device"] is not None:
    lines.append(f"  temporaries  {gib(r['temp_bytes_per_device'])}  (every temporary buffer; "
                 "the peak counts those alive at once)")
  peak = f"  peak         {gib(r['peak_bytes_per_device'])}"
  if r["fits"] is None:
    lines.append(peak)
  else:
    hbm, used = r["hbm_bytes_per_device"], r["peak_bytes_per_device"]
    verdict = (f"fits, {(hbm - used) / GIB:.2f} GiB to spare" if r["fits"] else
               f"DOES NOT FIT: {(used - hbm) / GIB:.2f} GiB over")
    if r["temp_bytes_per_device"] is None:
      verdict += " (the compiler refused it)"
    lines.append(f"{peak} of {hbm / GIB:.2f} GiB: {verdict}")
    if r["compiler"] == "cuda" and r["fits"] and used > 0.75 * hbm:
      lines.append("  (jax takes 75% of a GPU's memory by default: run with "
                   "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)")
    lines.append(f"step: {r['model_flops_per_step']:.3g} model FLOPs; at the chips' peak "
                 f"{r['min_step_s_at_peak']:.3g} s (a bound: speed is not measured here)")
  print("\n".join(lines), flush=True)
  print(json.dumps(r), flush=True)
