"""Full train steps compiled by the real TPU and GPU compilers (`--dry_run --target`), on
multi-chip meshes: SmolLM2-135M as configured, Llama-3-8B with 2 of its 32 layers under
fsdp x tensor sharding (the attention kernels run per shard), and a small MoE under expert
parallelism.

Each test runs train/dry_run.py in this process for compile-only devices of a named target
(train/accelerators.py) and checks what the compiler planned: the step fits the chip, the
attention is the Pallas kernel of that platform, parameters and optimizer state are split
over the mesh as the rules table says, and no f32 [B, T, V] logits are held (the loss scores
tokens in chunks: model/head.py). What this cannot tell: speed, or numerics on the device.
"""

import math
import os
import re

import pytest

from train.config import load_config
from train.dry_run import dry_run, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = {"tpu": "Mosaic flash", "cuda": "Triton flash"}


def _config(name, **overrides):
  return load_config(os.path.join(ROOT, "configs", name),
                     {k: str(v) for k, v in overrides.items()})


def _largest_array(hlo_text: str) -> int:
  """Elements of the largest array anywhere in a compiled program (fusion bodies included)."""
  return max(math.prod(int(d) for d in dims.split(",") if d)
             for dims in re.findall(r"\b(?:f32|bf16|f16|s32|u32|pred)\[([\d,]*)\]", hlo_text))


def _check(report, compiled, cfg, *, split):
  """The plan of a step that fits: the kernel, the parameter split, no full logits."""
  assert report["fits"], report
  assert KERNEL[report["compiler"]] in report["attention"], report["attention"]
  n = report["params"]
  # f32 master weights split `split` ways (the norm scales are replicated: a rounding error),
  # Adam's two moments likewise.
  assert abs(report["param_bytes_per_device"] - 4 * n / split) < 0.01 * 4 * n / split
  assert abs(report["optimizer_bytes_per_device"] - 8 * n / split) < 0.01 * 8 * n / split
  # No array of the device's [B, T, V] logits exists anywhere in the program, in any dtype:
  # the loss holds train.loss_chunk tokens' logits at a time. (The configs below keep the
  # device's B * T above d_model, so the FSDP-gathered [D, V] head stays smaller.)
  mesh = report["mesh"]
  rows = cfg.train.batch_size // (mesh["data"] * mesh["fsdp"] * cfg.train.microbatches)
  logits = rows * cfg.data.seq_len * cfg.model.vocab_size // mesh["tensor"]
  assert _largest_array(compiled.as_text()) < logits


@pytest.mark.parametrize("target,mesh,batch", [
    ("v5e-4", dict(data=1, fsdp=4, tensor=1), 8),
    ("h100-8", dict(data=2, fsdp=4, tensor=1), 16),
])
def test_smollm2_135m_train_step(target, mesh, batch, target_devices):
  target_devices(target)  # skips, saying why, without the compiler
  cfg = _config("smollm2_135m.py", **{f"mesh.{k}": v for k, v in mesh.items()},
                **{"train.batch_size": batch})
  report, compiled = plan(cfg, target)
  assert report["devices"] == mesh["data"] * mesh["fsdp"] * mesh["tensor"]
  _check(report, compiled, cfg, split=mesh["fsdp"])


@pytest.mark.parametrize("target,mesh,batch", [
    ("v5p-8", dict(data=1, fsdp=2, tensor=2), 4),
    ("a100-8", dict(data=1, fsdp=4, tensor=2), 8),
])
def test_llama3_8b_layers_train_step_fsdp_and_tensor(target, mesh, batch, target_devices):
  target_devices(target)
  cfg = _config("llama3_8b.py", **{f"mesh.{k}": v for k, v in mesh.items()},
                **{"train.batch_size": batch, "model.n_layers": 2, "data.seq_len": 4096})
  report, compiled = plan(cfg, target)
  # embedding + head + 2 layers of Llama-3-8B + the final norm
  per_layer = 4096 * (4096 * 2 + 1024 * 2) + 3 * 4096 * 14336 + 2 * 4096
  assert report["params"] == 2 * 128256 * 4096 + 2 * per_layer + 4096
  _check(report, compiled, cfg, split=mesh["fsdp"] * mesh["tensor"])


# The grouped-matmul kernels of a train step's experts: forward (gate, up, down) and backward.
MOE_KERNELS = {"tpu": {"gmm", "tgmm"},
               "cuda": {"grouped_matmul", "grouped_matmul_dx", "grouped_matmul_dw"}}


@pytest.mark.parametrize("target", ["v5p-8", "h100-8"])
def test_moe_train_step_with_expert_parallelism(target, target_devices):
  """configs/tiny_moe.py (2 layers, bf16) with mesh.expert=2: the real compiler builds the step
  with the experts run per expert shard (model/moe.py's shard_map) by the platform's
  grouped-matmul kernels (megablox on TPU, ours on GPU; pallas_kernels/grouped_matmul.py), and
  each device holds half the expert weights it holds with expert=1."""
  from train.dry_run import _bytes_per_device
  from train.loop import build_program, model_and_mesh
  devices = target_devices(target)
  small = {"model.n_layers": 2, "model.dtype": "bfloat16", "train.batch_size": 8,
           "data.seq_len": 128}

  def expert_bytes(cfg):
    prog = build_program(cfg, *model_and_mesh(cfg, devices))
    moe = lambda tree: {k: tree["layers"]["moe"][k] for k in ("gate", "up", "down")}
    return _bytes_per_device(moe(prog.abstract.params), moe(prog.shardings.params))

  fsdp = len(devices) // 2
  mesh = dict(data=1, fsdp=fsdp, expert=2, tensor=1)
  cfg = _config("tiny_moe.py", **{f"mesh.{k}": v for k, v in mesh.items()}, **small)
  report, compiled = plan(cfg, target)
  assert report["fits"] and report["mesh"] == mesh, report
  kernel = {"tpu": "megablox", "cuda": "triton"}[report["compiler"]]
  assert report["experts"].startswith(f"grouped matmul: {kernel}"), report["experts"]
  names = re.findall(r'op_name="[^"]*/(?:jit\()?(\w+)\)?/pallas_call"', compiled.as_text())
  assert MOE_KERNELS[report["compiler"]] <= set(names), names
  without = _config("tiny_moe.py", **{"mesh.data": 2, "mesh.fsdp": fsdp, "mesh.tensor": 1},
                    **small)
  e, d, f = cfg.model.n_experts, cfg.model.d_model, cfg.model.moe_d_ff
  expert_weights = 2 * 3 * e * d * f * 4  # 2 layers of gate, up, down in f32
  assert expert_bytes(without) == expert_weights // fsdp  # fsdp only
  assert expert_bytes(cfg) == expert_weights // (2 * fsdp)  # fsdp x expert


def test_a_step_that_does_not_fit_says_by_how_much(target_devices, capsys):
  """The TPU compiler refuses a program larger than the chip; the dry run reports it."""
  target_devices("v5e-1")
  cfg = _config("smollm2_135m.py", **{"mesh.data": 1, "train.batch_size": 64})
  report = dry_run(cfg, "v5e-1")
  assert report["fits"] is False
  assert report["peak_bytes_per_device"] > report["hbm_bytes_per_device"] > 15 * 2**30
  out = capsys.readouterr().out
  assert "DOES NOT FIT" in out and "GiB over" in out
