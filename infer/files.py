"""Files around a model: tokenizer files in the HF layout, sizes, and destinations that appear
only when complete. Shared by the GGUF and HF converters and train/convert.py."""

import contextlib
import json
import os
import re
import shutil
import tempfile

TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"


class ConversionError(ValueError):
  """A checkpoint that cannot be converted. The message names the file (and tensor)."""


def token_ids(tokenizer, tokenizer_config: dict) -> dict:
  """bos/eos/pad ids named by an HF tokenizer_config.json (strings or AddedToken dicts)."""
  out = {}
  for key in ("bos", "eos", "pad"):
    token = tokenizer_config.get(f"{key}_token")
    if isinstance(token, dict):
      token = token.get("content")
    out[f"{key}_token_id"] = (tokenizer.token_to_id(token)
                              if tokenizer is not None and token else None)
  return out


def read_tokenizer_files(directory: str):
  """(tokenizers.Tokenizer or None, tokenizer_config dict) from HF-style files in a dir.
  A `chat_template.jinja` (newer transformers save the template there) is folded in."""
  tokenizer = None
  path = os.path.join(directory, TOKENIZER)
  if os.path.isfile(path):
    from tokenizers import Tokenizer
    try:
      tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exceptions
      raise ConversionError(f"{path}: unreadable tokenizer ({e})") from None
  config = {}
  path = os.path.join(directory, TOKENIZER_CONFIG)
  if os.path.isfile(path):
    with open(path) as f:
      config = json.load(f)
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja) and not config.get("chat_template"):
    with open(jinja) as f:
      config["chat_template"] = f.read()
  return tokenizer, config


def write_tokenizer_files(directory: str, tokenizer, tokenizer_config: dict | None) -> None:
  if tokenizer is not None:
    tokenizer.save(os.path.join(directory, TOKENIZER))
  if tokenizer_config:
    with open(os.path.join(directory, TOKENIZER_CONFIG), "w") as f:
      json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)


def parse_size(size: str | int) -> int:
  """Bytes from 2GB / 500MB / 10KiB / 1234."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
  if not m:
    raise ValueError(f"cannot read a size from {size!r} (examples: 2GB, 500MB, 1234)")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def check_destination(dst: str, overwrite: bool = False) -> str:
  """The absolute path of `dst`, which must not exist (or be an empty dir) unless
  `overwrite`."""
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not overwrite and (not os.path.isdir(dst) or os.listdir(dst)):
    raise FileExistsError(f"{dst} already exists; choose another destination (or overwrite)")
  return dst


@contextlib.contextmanager
def atomic_directory(dst: str, overwrite: bool = False):
  """Yields a fresh temporary directory beside `dst`, renamed to `dst` only when the block
  succeeds: a failed conversion never leaves a half-written destination."""
  dst = check_destination(dst, overwrite)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o755)
    if os.path.exists(dst):
      old = tmp + ".old"
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
