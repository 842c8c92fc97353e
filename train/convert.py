"""Checkpoint conversion: GGUF, Hugging Face and our orbax run directories, one CLI.

  python train/convert.py --src gguf:SmolLM2.Q4_1.gguf --dst orbax:runs/smollm2
  python train/convert.py --src orbax:runs/smollm2 --dst hf:out/smollm2 --dtype bfloat16
  python train/convert.py --src hf:out/smollm2 --dst hf:out/smollm2-2gb --max_shard_size 2GB
  python train/convert.py --src hf:path/to/Llama-3.2-1B --dst orbax:runs/llama
  python train/convert.py --src orbax:runs/smollm2 --dst gguf:out/smollm2.gguf --gguf_type q8_0
  python train/convert.py --src orbax:runs/llama --dst orbax:runs/llama-int4 \
      --quantize int4 --group 128 --method gptq

Formats: `gguf` (a llama.cpp file; read and write), `hf` (a directory with config.json,
*.safetensors and an optional index; read and write), `orbax` (a run directory: config.json,
tokenizer files and checkpoints/0/params; read and write, local or gs://bucket/run).
Parameters are loaded straight into the mesh's shardings and written tensor by tensor; the
destination appears only when complete (remotely: its config.json is written last).

Quantization (`--quantize int8|int4|nf4`, orbax destinations): every block matmul becomes a
model/quant.py Quantized weight and config.json records how ("quant": quant.Spec), so every
reader of run directories (infer/workdir.py) loads the codes as they are. `--method rtn`
rounds to nearest; `gptq` and `awq` (model/calibrate.py) choose the codes on calibration text,
`--calib_tokens` tokens of `--calib` (default: the training split of the standard library, as
the default training run reads it) in rows of `--calib_len`, tokenized with the source's
tokenizer. A quantized orbax source is read dequantized.

GGUF export (`--dst gguf:FILE`): the architecture llama.cpp runs the model as, the tokenizer
(byte-level BPE) and chat template, Q/K rows in llama.cpp's order; `--gguf_type` f32, f16
(default), bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 (see infer/gguf_export.py for the tensors
kept at other types).

From Python: `convert("gguf:model.gguf", "orbax:runs/x")`,
`convert("orbax:runs/x", "orbax:runs/x4", quantize=Quantize(quant.Spec("int4", 64)))`.
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
from model import ModelConfig, quant, sharding

READ_FORMATS = ("gguf", "hf", "orbax")
WRITE_FORMATS = ("gguf", "hf", "orbax")


@dataclasses.dataclass
class Pretrained:
  """A model in memory, whatever file it came from."""
  cfg: ModelConfig
  params: Any  # our parameter pytree (jax.Arrays on some mesh)
  tokenizer: Any = None  # tokenizers.Tokenizer
  tokenizer_config: dict = dataclasses.field(default_factory=dict)  # HF tokenizer_config.json
  quantization: quant.Spec | None = None  # how params' Quantized weights were made, None if dense

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
  params = workdir_lib.load_params(path, cfg, mesh, dense=True)  # a quantized run dequantized
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
  config = run_config(model.cfg, final_path or directory)
  if model.quantization is not None:
    config[workdir_lib.QUANT] = model.quantization.to_dict()
  write_atomic(as_path(directory) / workdir_lib.CONFIG, json.dumps(config, indent=2))


def write(model: Pretrained, dst: str, *, max_shard_size: str | int = "5GB",
          dtype: str | None = None, overwrite: bool = False, gguf_type: str = "f16",
          log=None) -> str:
  """Writes `model` to `FORMAT:PATH`, all or nothing; returns the path."""
  fmt, path = parse_location(dst, WRITE_FORMATS, "--dst")
  path = os.fspath(as_path(path))
  if fmt == "gguf":
    from infer.gguf_export import save_gguf
    if dtype:
      raise ValueError("--dtype does not apply to a gguf destination; use --gguf_type")
    if model.quantization is not None:
      raise ValueError("GGUF export of quantized parameters: read the source dense (an orbax "
                       "source is) or export before --quantize")
    name = os.path.splitext(os.path.basename(path))[0]
    return save_gguf(path, model.cfg, model.params, model.tokenizer, model.tokenizer_config,
                     gguf_type=gguf_type, name=name, overwrite=overwrite, log=log)
  with atomic_directory(path, overwrite) as tmp:
    if fmt == "hf":
      write_hf(tmp, model.cfg, model.params, tokenizer=model.tokenizer,
               tokenizer_config=model.tokenizer_config, max_shard_size=max_shard_size,
               dtype=dtype)
    else:
      if dtype:
        if model.quantization is not None:
          raise ValueError("--dtype of a quantized model: set it before quantizing (convert "
                           "does)")
        model = with_config(model, param_dtype=dtype)
      write_workdir(tmp, model, final_path=path)
  return path


# ------------------------------------------------------------------------------ quantization

@dataclasses.dataclass(frozen=True)
class Quantize:
  """What --quantize and its flags ask for: the layout and method (spec), and for GPTQ/AWQ the
  calibration text (calib: "stdlib" or comma-separated globs; .jsonl files give their "text"
  fields), calib_tokens tokens of it in rows of calib_len."""
  spec: quant.Spec
  calib: str = "stdlib"
  calib_tokens: int = 16384
  calib_len: int = 512

  @classmethod
  def of_flags(cls, kind: str, group: int = 128, method: str = "rtn", symmetric: bool = True,
               double_quant: bool = False, **calibration) -> "Quantize":
    """From the CLI's flags, each error naming its flag."""
    if kind not in quant.KINDS:
      raise ValueError(f"--quantize={kind!r}: not one of {list(quant.KINDS)}")
    if method not in quant.METHODS:
      raise ValueError(f"--method={method!r}: not one of {list(quant.METHODS)}")
    if group < 0:
      raise ValueError(f"--group={group}: must be >= 0 (0: per output channel)")
    if not symmetric and kind != "int4":
      raise ValueError(f"--symmetric=false: zero points are int4's, not {kind}'s")
    if double_quant and kind != "nf4":
      raise ValueError(f"--double_quant=true: double quantization is nf4's, not {kind}'s")
    out = cls(quant.Spec(kind, group, symmetric, double_quant, method), **calibration)
    if out.calib_tokens < 1 or out.calib_len < 1:
      raise ValueError(f"--calib_tokens={out.calib_tokens} and --calib_len={out.calib_len} "
                       "must be >= 1")
    return out

  @property
  def calibrated(self) -> bool:
    return self.spec.method != "rtn"

  def check_files(self) -> list[str]:
    """The calibration files (before anything is loaded: a bad glob fails first)."""
    from train import data as data_lib
    if not self.calibrated:
      return []
    if self.calib == data_lib.STDLIB:
      from configs import base
      return data_lib.list_files(base.get_config().data)[0]  # the default run's train split
    return data_lib.match_files(self.calib, key="--calib")


def calibration_tokens(model: Pretrained, files: list[str], n_tokens: int, row_len: int):
  """int32[rows, row_len]: the first n_tokens of the files' documents as training reads them
  ([bos] text [eos], special-token text encoded as plain text), in the files' order, in rows
  of min(row_len, n_tokens, model.cfg.max_seq_len) tokens."""
  import types
  import numpy as np
  from infer.files import document_ids
  from train import data as data_lib
  bos, eos = document_ids(model.tokenizer, model.tokenizer_config)
  tokenizer = type(model.tokenizer).from_str(model.tokenizer.to_str())
  tokenizer.encode_special_tokens = True
  ids = []
  for path in files:
    fmt = "jsonl" if path.endswith(".jsonl") else "text"
    for text in data_lib.read_documents(path, types.SimpleNamespace(format=fmt,
                                                                   text_field="text")):
      if text:
        ids += ([] if bos is None else [bos]) + tokenizer.encode(
            text, add_special_tokens=False).ids + [eos]
    if len(ids) >= n_tokens:
      break
  ids = ids[:n_tokens]
  row_len = min(row_len, len(ids), model.cfg.max_seq_len)
  if not ids:
    raise ValueError(f"--calib: the {len(files)} file(s) hold no text")
  rows = len(ids) // row_len
  return np.asarray(ids[:rows * row_len], np.int32).reshape(rows, row_len)


def quantized(model: Pretrained, request: Quantize, files: list[str] | None = None,
              src: str = "", log=None) -> Pretrained:
  """The model with its block matmuls quantized as `request` says."""
  from model import calibrate
  try:
    request.spec.check(model.params)
  except ValueError as e:
    raise ValueError(f"--group={request.spec.group}: {e}") from None
  tokens = None
  if request.calibrated:
    if model.tokenizer is None:
      raise ValueError(f"--method={request.spec.method} calibrates on text tokenized with the "
                       f"model's tokenizer, and {src or 'the source'} has none "
                       "(tokenizer.json); use --method rtn")
    files = request.check_files() if files is None else files
    tokens = calibration_tokens(model, files, request.calib_tokens, request.calib_len)
    if log is not None:
      log(f"calibrating on {tokens.shape[0]} rows of {tokens.shape[1]} tokens")
  params = calibrate.quantize_model(model.cfg, model.params, tokens, request.spec, log=log)
  return dataclasses.replace(model, params=params, quantization=request.spec)


def convert(src: str, dst: str, *, max_shard_size: str | int = "5GB", dtype: str | None = None,
            scan_layers: bool | None = None, mesh=None, overwrite: bool = False,
            quantize: Quantize | None = None, gguf_type: str | None = None,
            log=None) -> str:
  """Converts `src` to `dst` (both FORMAT:PATH); returns the destination path.

  dtype: stored weights of the destination (float32, bfloat16, float16; default: as the
  source holds them, float32 for GGUF); with `quantize`, the dtype the weights dequantize to.
  scan_layers: the orbax destination's layer layout (default: the source's, scanned for
  gguf/hf). quantize: an orbax destination's quantization (module docstring). gguf_type: a
  gguf destination's tensor type (default f16; infer/gguf_export.py GGUF_TYPES)."""
  fmt, path = parse_location(dst, WRITE_FORMATS, "--dst")  # fail before loading anything
  check_destination(path, overwrite)
  if quantize is not None and fmt != "orbax":
    raise ValueError(f"--quantize writes orbax run directories, not {fmt}")
  if gguf_type is not None and fmt != "gguf":
    raise ValueError(f"--gguf_type={gguf_type!r} is for gguf destinations, not {fmt}")
  if fmt == "gguf":
    from infer.gguf_export import ggml_type
    gguf_type = gguf_type or "f16"
    ggml_type(gguf_type)
    if dtype:
      raise ValueError("--dtype does not apply to a gguf destination; use --gguf_type")
  files = quantize.check_files() if quantize is not None else None
  overrides = {} if scan_layers is None else {"scan_layers": scan_layers}
  model = read(src, mesh, **overrides)
  if quantize is not None:
    if dtype:
      model, dtype = with_config(model, mesh, param_dtype=dtype), None
    model = quantized(model, quantize, files, src, log)
  return write(model, dst, max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite,
               gguf_type=gguf_type or "f16", log=log)


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
  parser.add_argument("--gguf_type", default=None,
                      help="tensor type of a gguf destination: f32, f16 (default), bf16, q8_0, "
                           "q4_0, q4_1, q5_0, q5_1")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing destination (only once the new one is done)")
  q = parser.add_argument_group("quantization (orbax destinations)")
  q.add_argument("--quantize", default=None, choices=quant.KINDS,
                 help="quantize every block matmul (default: no quantization)")
  # Defaults None: a flag given without --quantize is an error, not silently ignored.
  q.add_argument("--group", type=int, default=None,
                 help="input elements a scale covers (default 128); 0: one per output channel")
  q.add_argument("--method", default=None, choices=quant.METHODS,
                 help="rtn (default): round to nearest; gptq, awq: calibrated on --calib")
  q.add_argument("--symmetric", default=None, choices=("true", "false"),
                 help="false: int4 with zero points (default true)")
  q.add_argument("--double_quant", default=None, choices=("true", "false"),
                 help="nf4's scales as int8, QLoRA's double quantization (default false)")
  q.add_argument("--calib", default=None,
                 help="calibration text of gptq/awq: 'stdlib' (default: the standard library) "
                      "or comma-separated globs (.jsonl files: their 'text' fields)")
  q.add_argument("--calib_tokens", type=int, default=None,
                 help="calibration tokens (default 16384)")
  q.add_argument("--calib_len", type=int, default=None,
                 help="tokens per calibration row (default 512)")
  args = parser.parse_args(argv)
  flags = {k: v for k, v in vars(args).items() if v is not None and k in (
      "group", "method", "symmetric", "double_quant", "calib", "calib_tokens", "calib_len")}
  try:
    request = None
    if args.quantize is None and flags:
      raise ValueError(f"{', '.join('--' + k for k in flags)} set without --quantize")
    if args.quantize is not None:
      calibrated = flags.get("method", "rtn") != "rtn"
      if not calibrated and {"calib", "calib_tokens", "calib_len"} & set(flags):
        raise ValueError("--calib, --calib_tokens and --calib_len are for --method gptq|awq")
      request = Quantize.of_flags(
          args.quantize, flags.get("group", 128), flags.get("method", "rtn"),
          flags.get("symmetric", "true") == "true", flags.get("double_quant") == "true",
          **{k: flags[k] for k in ("calib", "calib_tokens", "calib_len") if k in flags})
    path = convert(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                   scan_layers=None if args.scan_layers is None else args.scan_layers == "true",
                   overwrite=args.overwrite, quantize=request, gguf_type=args.gguf_type,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
  except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
