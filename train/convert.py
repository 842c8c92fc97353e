"""Checkpoint conversion: GGUF, Hugging Face and our orbax run directories, one CLI.

  python train/convert.py --src gguf:SmolLM2.Q4_1.gguf --dst orbax:runs/smollm2
  python train/convert.py --src orbax:runs/smollm2 --dst hf:out/smollm2 --dtype bfloat16
  python train/convert.py --src hf:out/smollm2 --dst hf:out/smollm2-2gb --max_shard_size 2GB
  python train/convert.py --src hf:path/to/Llama-3.2-1B --dst orbax:runs/llama

Formats: `gguf` (read), `hf` (a directory with config.json, *.safetensors and an optional
index; read and write), `orbax` (a run directory: config.json, tokenizer files and
checkpoints/0/params; read and write, local or gs://bucket/run). Parameters are loaded
straight into the mesh's shardings and written tensor by tensor; the destination appears only
when complete (remotely: its config.json is written last).

From Python: `convert("gguf:model.gguf", "orbax:runs/x")`.
"""

import os
import sys

if __name__ == "__main__":  # `python train/convert.py` from the repo root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import dataclasses
import json
from typing import Any

from infer import workdir as workdir_lib
from infer.files import (ConversionError, as_path, atomic_directory, check_destination,
                         is_remote, read_tokenizer_files, token_ids, write_atomic,
                         write_tokenizer_files)
from infer.hf import load_hf, relayout, write_hf
from model import ModelConfig, sharding

READ_FORMATS = ("gguf", "hf", "orbax")
WRITE_FORMATS = ("hf", "orbax")


@dataclasses.dataclass
class Pretrained:
  """A model in memory, whatever file it came from."""
  cfg: ModelConfig
  params: Any  # our parameter pytree (jax.Arrays on some mesh)
  tokenizer: Any = None  # tokenizers.Tokenizer
  tokenizer_config: dict = dataclasses.field(default_factory=dict)  # HF tokenizer_config.json

  @property
  def ids(self) -> dict:
    """bos_token_id / eos_token_id / pad_token_id (None where unknown)."""
    return token_ids(self.tokenizer, self.tokenizer_config)


def parse_location(text: str, formats: tuple[str, ...], flag: str) -> tuple[str, str]:
  fmt, sep, path = text.partition(":")
  if not sep or fmt not in formats or not path:
    raise ValueError(f"{flag}={text!r}: expected FORMAT:PATH with FORMAT one of {list(formats)}")
  if fmt != "orbax" and is_remote(path):
    raise ValueError(f"{flag}={text!r}: {fmt} files are read and written locally; only orbax "
                     "run directories may be remote")
  return fmt, path


def default_mesh():
  """Parameters spread over every local device (fsdp): no device holds the whole model."""
  return sharding.make_mesh(1, -1, 1)


def read(src: str, mesh=None, **config_overrides) -> Pretrained:
  """Loads `FORMAT:PATH` onto `mesh`. `config_overrides`: ModelConfig fields
  (scan_layers, param_dtype, ...)."""
  fmt, path = parse_location(src, READ_FORMATS, "--src")
  mesh = default_mesh() if mesh is None else mesh
  if fmt == "gguf":
    from infer.gguf import load_gguf
    cfg, params, tokenizer, extra = load_gguf(path, mesh, **config_overrides)
    return Pretrained(cfg, params, tokenizer, extra["tokenizer_config"])
  if fmt == "hf":
    cfg, params, tokenizer, extra = load_hf(path, mesh, **config_overrides)
    return Pretrained(cfg, params, tokenizer, extra["tokenizer_config"])
  cfg = workdir_lib.load_model_config(path)  # orbax
  params = workdir_lib.load_params(path, cfg, mesh)
  tokenizer, tokenizer_config = read_tokenizer_files(path)
  model = Pretrained(cfg, params, tokenizer, tokenizer_config)
  return with_config(model, mesh, **config_overrides) if config_overrides else model


def with_config(model: Pretrained, mesh=None, **changes) -> Pretrained:
  """The model with ModelConfig fields changed (layout or dtype; shapes must stay)."""
  new_cfg = dataclasses.replace(model.cfg, **changes)
  if new_cfg == model.cfg:
    return model
  params = relayout(model.cfg, model.params, new_cfg, default_mesh() if mesh is None else mesh)
  return dataclasses.replace(model, cfg=new_cfg, params=params)


def run_config(cfg: ModelConfig, path: str) -> dict:
  """The full default run config (configs/base.py) with this model: training can start
  from a converted workdir like from any run."""
  from configs import base
  config = base.get_config().to_dict()
  config["model"] = dataclasses.asdict(cfg)
  config["workdir"] = path
  return config


def write_workdir(directory: str, model: Pretrained, final_path: str | None = None) -> None:
  """A run directory in `directory` (empty, local or remote): tokenizer files, a params-only
  checkpoint at step 0, and config.json last (what makes it a run directory)."""
  from train.checkpoint import Checkpointer
  write_tokenizer_files(directory, model.tokenizer, model.tokenizer_config)
  ckpt = Checkpointer(directory, keep=1, async_save=False)
  try:
    ckpt.save_params(0, model.params)
  finally:
    ckpt.close()
  write_atomic(as_path(directory) / workdir_lib.CONFIG,
               json.dumps(run_config(model.cfg, final_path or directory), indent=2))


def write(model: Pretrained, dst: str, *, max_shard_size: str | int = "5GB",
          dtype: str | None = None, overwrite: bool = False) -> str:
  """Writes `model` to `FORMAT:PATH`, all or nothing; returns the path."""
  fmt, path = parse_location(dst, WRITE_FORMATS, "--dst")
  path = os.fspath(as_path(path))
  with atomic_directory(path, overwrite) as tmp:
    if fmt == "hf":
      write_hf(tmp, model.cfg, model.params, tokenizer=model.tokenizer,
               tokenizer_config=model.tokenizer_config, max_shard_size=max_shard_size,
               dtype=dtype)
    else:
      if dtype:
        model = with_config(model, param_dtype=dtype)
      write_workdir(tmp, model, final_path=path)
  return path


def convert(src: str, dst: str, *, max_shard_size: str | int = "5GB", dtype: str | None = None,
            scan_layers: bool | None = None, mesh=None, overwrite: bool = False) -> str:
  """Converts `src` to `dst` (both FORMAT:PATH); returns the destination path.

  dtype: stored weights of the destination (float32, bfloat16, float16; default: as the
  source holds them, float32 for GGUF). scan_layers: the orbax destination's layer layout
  (default: the source's, scanned for gguf/hf)."""
  _, path = parse_location(dst, WRITE_FORMATS, "--dst")  # fail before loading anything
  check_destination(path, overwrite)
  overrides = {} if scan_layers is None else {"scan_layers": scan_layers}
  model = read(src, mesh, **overrides)
  return write(model, dst, max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--src", required=True, help=f"FORMAT:PATH, FORMAT in {READ_FORMATS}")
  parser.add_argument("--dst", required=True, help=f"FORMAT:PATH, FORMAT in {WRITE_FORMATS}")
  parser.add_argument("--max_shard_size", default="5GB",
                      help="largest safetensors file of an hf destination (e.g. 2GB, 500MB)")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                      help="dtype of the written weights (default: the source's)")
  parser.add_argument("--scan_layers", default=None, choices=("true", "false"),
                      help="layer layout of an orbax destination (default: the source's)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing destination (only once the new one is done)")
  args = parser.parse_args(argv)
  try:
    path = convert(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                   scan_layers=None if args.scan_layers is None else args.scan_layers == "true",
                   overwrite=args.overwrite)
  except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
