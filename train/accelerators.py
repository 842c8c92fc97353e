"""The accelerators we know: each chip's peak FLOP/s and memory, and named compile targets.

A *target* is a pod slice or GPU box named as its vendor names it (`v5p-128`, `v5e-16`,
`2xv5p-128`, `h100-8`, `h100-8x4`). `target_devices` returns compile-only devices for it: the
real TPU compiler (libtpu, `jax[tpu]`) or the real GPU compiler (XLA:GPU with Triton and ptxas,
`jax[cuda12]` run with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) then compiles for that hardware on a
CPU-only machine and reports its memory plan. Nothing runs; nothing is allocated.

TPU names count what Google's accelerator types count: TensorCores for v2, v3, v4 and v5p (two
per chip; v4 and v5p chips are one jax device each, "megacore"), chips for v5e and v6e. So
`v5p-128` is 64 chips (a 4x4x4 torus) and `v5e-16` 16 chips.
"""

import dataclasses
import math
import os
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One jax device of a kind: its dense bf16 peak (the data sheet's) and the memory a program
  may use (TPU: what libtpu's compiler reports available; GPU: what the CUDA runtime reports)."""
  name: str
  kinds: tuple[str, ...]  # lower-case substrings of jax's `device_kind` that name this chip
  bf16_tflops: float  # dense, per jax device
  hbm_gib: float  # per jax device

  @property
  def hbm_bytes(self) -> int:
    return int(self.hbm_gib * GIB)


# Most specific kinds first: "tpu v5 lite" must match before "tpu v5".
CHIPS = (
    Chip("TPU v6e", ("tpu v6 lite", "tpu v6e"), 918.0, 31.25),
    Chip("TPU v5e", ("tpu v5 lite", "tpu v5e"), 197.0, 15.75),
    Chip("TPU v5p", ("tpu v5p", "tpu v5"), 459.0, 95.74),
    Chip("TPU v4", ("tpu v4",), 275.0, 30.75),
    Chip("TPU v3", ("tpu v3",), 61.5, 16.0),  # a v3 chip is two jax devices (TensorCores)
    Chip("TPU v2", ("tpu v2",), 22.5, 8.0),  # likewise
    Chip("B200", ("b200",), 2250.0, 179.0),
    Chip("H200", ("h200",), 989.0, 140.4),
    Chip("H100 PCIe", ("h100 pcie",), 756.0, 79.1),
    Chip("H100", ("h100",), 989.0, 79.1),  # SXM
    Chip("A100 40GB", ("a100-sxm4-40gb", "a100-pcie-40gb", "a100 40gb"), 312.0, 39.4),
    Chip("A100", ("a100",), 312.0, 79.35),
    Chip("A10G", ("a10g",), 125.0, 22.5),
    Chip("L40S", ("l40s",), 362.0, 44.4),  # before L4: "l4" is a substring of "NVIDIA L40S"
    Chip("L40", ("l40",), 181.0, 44.4),
    Chip("L4", ("l4",), 121.0, 22.5),
    Chip("T4", ("t4",), 65.0, 15.0),  # fp16: a T4 has no bf16 tensor cores
)


def chip_of(device_kind: str) -> Chip | None:
  """The chip a jax `device_kind` names ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), or None."""
  kind = device_kind.lower()
  for chip in CHIPS:
    if any(k in kind for k in chip.kinds):
      return chip
  return None


# ------------------------------------------------------------------------------------ targets


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  compiler: str  # "tpu" or "cuda"
  chip: Chip
  slices: int  # TPU slices joined over the data-centre network, or GPU hosts
  per_slice: int  # jax devices per slice (or per host)
  topology: str  # TPU: "v5:4x4x4" (per slice); GPU: "1xHOSTSxGPUS"

  @property
  def devices(self) -> int:
    return self.slices * self.per_slice


# TPU generations: (name prefix, libtpu topology prefix, chip, TensorCores per device in the
# name's count, default 3-D torus?).
_TPU = {
    "v4": ("v4", "TPU v4", 2, True),
    "v5p": ("v5", "TPU v5p", 2, True),
    "v5e": ("v5e", "TPU v5e", 1, False),
    "v5litepod": ("v5e", "TPU v5e", 1, False),
    "v6e": ("v6e", "TPU v6e", 1, False),
}
# Slice shapes by chip count, as Google provisions them.
_TORUS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
            256: (16, 16)}

# GPU boxes: name -> (chip, the GpuTargetConfig figures the compiler plans with). From NVIDIA's
# data sheets and what the CUDA runtime reports for each card.
_GPU = {
    "h100": ("H100", dict(
        description="NVIDIA H100 80GB HBM3", cc=(9, 0), sms=132, fpus_per_core=128,
        smem_per_block_optin=232448, smem_per_core=233472, l2=52428800,
        bandwidth=3352320000000, clock_ghz=1.98, memory=84929347584)),
    "h200": ("H200", dict(
        description="NVIDIA H200", cc=(9, 0), sms=132, fpus_per_core=128,
        smem_per_block_optin=232448, smem_per_core=233472, l2=52428800,
        bandwidth=4800000000000, clock_ghz=1.98, memory=150754820096)),
    "a100": ("A100", dict(
        description="NVIDIA A100-SXM4-80GB", cc=(8, 0), sms=108, fpus_per_core=64,
        smem_per_block_optin=166912, smem_per_core=167936, l2=41943040,
        bandwidth=2039000000000, clock_ghz=1.41, memory=85198045184)),
}

EXAMPLES = ("v4-32", "v5e-16", "v5litepod-16", "v5p-128", "v6e-64", "2xv5p-128", "h100-8",
            "a100-8", "h200-8", "h100-8x4")


def known_targets_text() -> str:
  return (f"TPU: {{v4,v5p}}-<TensorCores>, {{v5e,v5litepod,v6e}}-<chips>, "
          f"multi-slice <n>x<type> (chip counts {sorted(_TORUS_3D)} for v4/v5p, "
          f"{sorted(_GRID_2D)} for v5e/v6e); GPU: {{{','.join(sorted(_GPU))}}}-<GPUs per host> "
          f"or -<GPUs>x<hosts>. Examples: {', '.join(EXAMPLES)}")


def parse_target(name: str) -> Target:
  """A Target from a name such as "v5p-128", "2xv5p-128", "v5e-16" or "h100-8x4"."""
  text = name.strip().lower()
  m = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
  if m:
    slices, gen, count = int(m.group(1) or 1), m.group(2), int(m.group(3))
    prefix, chip_name, cores, torus = _TPU[gen]
    chips = count // cores if count % cores == 0 else 0
    shapes = _TORUS_3D if torus else _GRID_2D
    if chips not in shapes or slices < 1:
      raise ValueError(f"unknown target {name!r}: {gen}-{count} is not a slice we know. "
                       + known_targets_text())
    topology = f"{prefix}:" + "x".join(map(str, shapes[chips]))
    return Target(name, "tpu", _chip(chip_name), slices, chips, topology)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)(?:x(\d+))?", text)
  if m and m.group(1) in _GPU and int(m.group(2)) >= 1:
    per_host, hosts = int(m.group(2)), int(m.group(3) or 1)
    chip = _chip(_GPU[m.group(1)][0])
    return Target(name, "cuda", chip, hosts, per_host, f"1x{hosts}x{per_host}")
  raise ValueError(f"unknown target {name!r}. " + known_targets_text())


def _chip(name: str) -> Chip:
  return next(c for c in CHIPS if c.name == name)


def gpu_target_config(kind: str) -> str:
  """The GpuTargetConfig text proto of a GPU kind ("h100", "a100", "h200") for the deviceless
  compiler: the card's figures, as the CUDA runtime would report them."""
  f = _GPU[kind][1]
  major, minor = f["cc"]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {f["smem_per_core"]}
  threads_per_core_limit: 2048
  core_count: {f["sms"]}
  fpus_per_core: {f["fpus_per_core"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {f["bandwidth"]}
  l2_cache_size: {f["l2"]}
  clock_rate_ghz: {f["clock_ghz"]}
  device_memory_size: {f["memory"]}
  shared_memory_per_block_optin: {f["smem_per_block_optin"]}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
runtime_version: {{
  major: 12
  minor: 8
  patch: 0
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 7
}}
device_description_str: "{f["description"]}"
"""


def prepare_environment() -> None:
  """Before jax is imported: run jax itself on the CPU and let the CUDA plugin load without a
  driver, so that the compilers can be asked for compile-only devices."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  # libtpu takes a lock file so that one process owns the chips; compiling owns nothing, so
  # several compiling processes (test workers, a dry run beside them) may load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def compiler_available(compiler: str) -> str | None:
  """None if this machine can compile for `compiler` ("tpu", "cuda"); else why not."""
  import importlib.util
  package = {"tpu": "libtpu", "cuda": "jax_cuda12_plugin"}[compiler]
  if importlib.util.find_spec(package) is None:
    extra = {"tpu": "jax[tpu]", "cuda": "jax[cuda12]"}[compiler]
    return (f"the {compiler} compiler is not installed: pip install \"{extra}==<the pinned "
            "jax>\" (or this project's 'accel' extra)")
  return None


def target_devices(target: Target | str) -> list:
  """Compile-only jax devices of `target`, in the order a mesh should take them (slice/host
  major). Raises RuntimeError when the compiler is not installed."""
  import jax  # noqa: F401  (after prepare_environment)
  from jax.experimental import topologies

  target = parse_target(target) if isinstance(target, str) else target
  missing = compiler_available(target.compiler)
  if missing:
    raise RuntimeError(missing)
  if target.compiler == "tpu":
    torus = target.chip.name in ("TPU v4", "TPU v5p")
    dims = [int(x) for x in target.topology.split(":")[1].split("x")]
    # Slices of 64+ chips are full tori (wrap-around links); smaller ones are open.
    wrap = (tuple(d >= 4 for d in dims) if torus and math.prod(dims) >= 64
            else tuple(d >= 16 for d in dims) + (False,) * (3 - len(dims)))
    topo = topologies.get_topology_desc(
        topology_name=target.topology, platform="tpu",
        chip_config_name="megacore" if torus else "default",
        chips_per_host_bounds=tuple(min(b, d) for b, d in zip((2, 2, 1), dims + [1])),
        num_slices=target.slices, wrap=wrap[:3])
  else:
    kind = next(k for k, (chip, _) in _GPU.items() if chip == target.chip.name)
    topo = topologies.get_topology_desc("jaxllm", "cuda", target_config=gpu_target_config(kind),
                                        topology=target.topology)
  return list(topo.devices)
