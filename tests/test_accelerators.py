"""Named targets and the chip table (train/accelerators.py), against Google's and NVIDIA's own
figures, and the compile-only devices they give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from model import sharding
from train import accelerators as acc


@pytest.mark.parametrize("name,compiler,chip,devices,slices,topology", [
    # Google counts TensorCores for v4/v5p (two per chip, one jax device per chip) ...
    ("v4-32", "tpu", "TPU v4", 16, 1, "v4:2x2x4"),
    ("v5p-128", "tpu", "TPU v5p", 64, 1, "v5:4x4x4"),
    ("2xv5p-128", "tpu", "TPU v5p", 128, 2, "v5:4x4x4"),
    # ... and chips for v5e/v6e.
    ("v5e-16", "tpu", "TPU v5e", 16, 1, "v5e:4x4"),
    ("v5litepod-16", "tpu", "TPU v5e", 16, 1, "v5e:4x4"),
    ("v6e-64", "tpu", "TPU v6e", 64, 1, "v6e:8x8"),
    ("h100-8", "cuda", "H100", 8, 1, "1x1x8"),
    ("a100-8", "cuda", "A100", 8, 1, "1x1x8"),
    ("h200-8", "cuda", "H200", 8, 1, "1x1x8"),
    ("h100-8x4", "cuda", "H100", 32, 4, "1x4x8"),
])
def test_parse_target(name, compiler, chip, devices, slices, topology):
  t = acc.parse_target(name)
  assert (t.compiler, t.chip.name, t.devices, t.slices, t.topology) == (
      compiler, chip, devices, slices, topology)


@pytest.mark.parametrize("name", ["v5p-100", "v5e-3", "v5p-7", "x100-8", "h100", "tpu", ""])
def test_unknown_target_names_the_known_ones(name):
  with pytest.raises(ValueError, match="unknown target") as e:
    acc.parse_target(name)
  assert "v5p-128" in str(e.value) and "h100-8" in str(e.value)


@pytest.mark.parametrize("kind,chip", [
    ("TPU v2", "TPU v2"), ("TPU v3", "TPU v3"), ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"), ("TPU v5", "TPU v5p"), ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"), ("Tesla T4", "T4"), ("NVIDIA L4", "L4"),
    ("NVIDIA A10G", "A10G"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"), ("NVIDIA B200", "B200"),
])
def test_chip_of_device_kinds(kind, chip):
  assert acc.chip_of(kind).name == chip


def test_unknown_kinds_are_none():
  assert acc.chip_of("cpu") is None and acc.chip_of("Intel(R) Data Center GPU Max") is None


@pytest.mark.parametrize("name", ["v5e-4", "v5p-8", "v6e-4", "h100-8", "a100-8"])
def test_target_devices_compile_a_sharded_program(target_devices, name):
  """The compile-only devices are the target's chip, and its compiler builds a sharded
  program for them, planning the memory of one shard per device."""
  target = acc.parse_target(name)
  devices = target_devices(name)
  assert len(devices) == target.devices
  assert {acc.chip_of(d.device_kind).name for d in devices} == {target.chip.name}
  mesh = sharding.make_mesh(-1, 1, 1, devices)
  x = jax.ShapeDtypeStruct((1024, 2048), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  compiled = jax.jit(lambda a: jnp.tanh(a) @ a.T).lower(x).compile()
  assert compiled.memory_analysis().argument_size_in_bytes == 1024 * 2048 * 4 // len(devices)


@pytest.mark.parametrize("expert", [1, 2])
def test_multislice_mesh_puts_slices_on_the_data_axis(target_devices, expert):
  devices = target_devices("2xv5p-16")
  mesh = sharding.make_mesh(4, 2, 2 // expert, devices, expert=expert)
  assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  # Each slice holds half of the data axis and every fsdp/expert/tensor peer of its devices.
  assert (slice_of[:2] == slice_of[0, 0, 0, 0]).all()
  assert (slice_of[2:] == slice_of[2, 0, 0, 0]).all()
  assert slice_of[0, 0, 0, 0] != slice_of[2, 0, 0, 0]
  with pytest.raises(ValueError, match="mesh.data=1 must be a multiple of 2"):
    sharding.make_mesh(1, 8, 2, devices)


@pytest.mark.parametrize("name,shape", [("v5p-128", (4, 4, 4)), ("v5e-16", (2, 4, 2)),
                                        ("h100-8", (2, 2, 2)), ("2xv5p-16", (4, 2, 2))])
def test_meshes_without_experts_keep_their_devices(target_devices, name, shape):
  """The expert axis (size 1) changes no device's place: the (data, fsdp, 1, tensor) mesh
  lays out its devices as the 3-axis mesh did, so such steps compile as before."""
  from jax.experimental import mesh_utils
  devices = target_devices(name)
  slices = acc.parse_target(name).slices
  if slices > 1:
    before = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // slices, *shape[1:]), (slices, 1, 1), devices)
  else:
    before = jax.make_mesh(shape, ("data", "fsdp", "tensor"), devices=devices).devices
  assert (sharding.make_mesh(*shape, devices).devices[:, :, 0, :] == before).all()


def test_gpu_target_config_states_the_card():
  text = acc.gpu_target_config("a100")
  assert "core_count: 108" in text and "major: 8" in text and "A100" in text
