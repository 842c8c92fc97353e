"""Files around a model: paths that may be remote, atomic writes, tokenizer files in the HF
layout, sizes, and destinations that appear only when complete. Shared by the run directory
(infer/workdir.py, training), the GGUF and HF converters and train/convert.py.

Run directories may live on a remote filesystem (`gs://bucket/run`): everything that reads or
writes them goes through `etils.epath` (gcsfs or tf.io.gfile behind `gs://`), and orbax reads
and writes their checkpoints (tensorstore's gcs driver behind `gs://`).
"""

import contextlib
import json
import os
import re
import shutil
import tempfile

from etils import epath

TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
# The document separator of the tokenizers we train (train/tokenizer.py), GPT-2's.
ENDOFTEXT = "<|endoftext|>"
# The URL schemes epath knows; orbax (tensorstore) checkpoints only local paths and gs://.
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def is_remote(path) -> bool:
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def as_path(path) -> epath.Path:
  """An epath.Path for a local or remote path; local ones made absolute (orbax needs that)."""
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def write_atomic(path, data: str | bytes) -> None:
  """Writes a whole file so that readers see the old content or the new, never a part:
  locally a temporary file renamed over it; remotely one object write (an object store
  publishes an object only once its upload completes)."""
  path = as_path(path)
  mode = "w" if isinstance(data, str) else "wb"
  if is_remote(path):
    with path.open(mode) as f:
      f.write(data)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    with tmp.open(mode) as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def read_tokenizer(path):
  """A tokenizers.Tokenizer from a tokenizer.json anywhere epath reaches."""
  from tokenizers import Tokenizer
  return Tokenizer.from_str(as_path(path).read_text())


class ConversionError(ValueError):
  """A checkpoint that cannot be converted. The message names the file (and tensor)."""


def token_ids(tokenizer, tokenizer_config: dict) -> dict:
  """bos/eos/pad ids named by an HF tokenizer_config.json (strings or AddedToken dicts)."""
  out = {}
  for key in ("bos", "eos", "pad"):
    token = _content(tokenizer_config.get(f"{key}_token"))
    out[f"{key}_token_id"] = (tokenizer.token_to_id(token)
                              if tokenizer is not None and token else None)
  return out


def _content(token):
  return token.get("content") if isinstance(token, dict) else token


def document_ids(tokenizer, tokenizer_config: dict) -> tuple[int | None, int]:
  """(bos, eos): the ids around each document in training, `[bos] text [eos]`, and before a
  plain prompt; bos is None where the model family adds none.

  eos: tokenizer_config's `eos_token` (an HF tokenizer_config.json's, or the GGUF's
  `tokenizer.ggml.eos_token_id` that infer/gguf.py writes there). bos: `bos_token`, where
  `add_bos_token` says so or, without that key, where the tokenizer's post-processor puts it
  first (Llama 3, Mistral, Gemma add one; Qwen2/3 name none). A config that names no EOS is a
  tokenizer we trained: its `<|endoftext|>` goes on both sides, as GPT-2 did.
  Raises ValueError naming the key when no EOS can be found."""
  eos_token = _content(tokenizer_config.get("eos_token"))
  if not eos_token:
    eos = tokenizer.token_to_id(ENDOFTEXT)
    if eos is None:
      raise ValueError(
          f"no end-of-document token: tokenizer_config.json names no 'eos_token' (nor do "
          f"generation_config.json or config.json an 'eos_token_id', or a GGUF "
          f"'tokenizer.ggml.eos_token_id') and the tokenizer has no {ENDOFTEXT!r}")
    return eos, eos
  ids = token_ids(tokenizer, tokenizer_config)
  if ids["eos_token_id"] is None:
    raise ValueError(f"tokenizer_config.json's 'eos_token' {eos_token!r} is not a token of "
                     "the tokenizer")
  bos, add_bos = ids["bos_token_id"], tokenizer_config.get("add_bos_token")
  if add_bos is None and bos is not None:  # what the tokenizer itself does
    added = tokenizer.encode("a").ids
    add_bos = added[:1] == [bos] and added != tokenizer.encode("a", add_special_tokens=False).ids
  if add_bos and bos is None:
    raise ValueError(f"tokenizer_config.json has 'add_bos_token' but its 'bos_token' "
                     f"{tokenizer_config.get('bos_token')!r} is not a token of the tokenizer")
  return (bos if add_bos else None), ids["eos_token_id"]


def read_tokenizer_config(directory, tokenizer=None) -> dict:
  """A directory's tokenizer_config.json ({} if absent), completed as the model's other files
  say: the template of `chat_template.jinja` (where newer transformers save it), and bos_token
  / eos_token, where it has no such key, from special_tokens_map.json or, as ids, from
  generation_config.json, then config.json (of a list of EOS ids, the first). Ids become
  token strings (of `tokenizer`, default the directory's tokenizer.json)."""
  directory = as_path(directory)
  config = _json(directory / TOKENIZER_CONFIG)
  jinja = directory / "chat_template.jinja"
  if jinja.is_file() and not config.get("chat_template"):
    config["chat_template"] = jinja.read_text()
  missing = [k for k in ("bos_token", "eos_token") if k not in config]
  if not missing:
    return config
  special = _json(directory / "special_tokens_map.json")
  ids = {**_json(directory / "config.json"), **_json(directory / "generation_config.json")}
  for key in missing:
    found = ids.get(f"{key}_id")
    found = found[0] if isinstance(found, list) and found else found
    if special.get(key):
      config[key] = special[key]
    elif isinstance(found, int):
      if tokenizer is None and (directory / TOKENIZER).is_file():
        tokenizer = read_tokenizer(directory / TOKENIZER)
      token = tokenizer.id_to_token(found) if tokenizer is not None else None
      if token is not None:
        config[key] = token
  return config


def _json(path) -> dict:
  if not path.is_file():
    return {}
  try:
    value = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not JSON ({e})") from None
  return value if isinstance(value, dict) else {}


def read_tokenizer_files(directory: str):
  """(tokenizers.Tokenizer or None, tokenizer_config dict, see read_tokenizer_config) from
  HF-style files in a dir."""
  directory = as_path(directory)
  tokenizer = None
  path = directory / TOKENIZER
  if path.is_file():
    try:
      tokenizer = read_tokenizer(path)
    except Exception as e:  # tokenizers raises plain Exceptions
      raise ConversionError(f"{path}: unreadable tokenizer ({e})") from None
  return tokenizer, read_tokenizer_config(directory, tokenizer)


def write_tokenizer_files(directory: str, tokenizer, tokenizer_config: dict | None) -> None:
  directory = as_path(directory)
  if tokenizer is not None:
    write_atomic(directory / TOKENIZER, tokenizer.to_str(pretty=True))
  if tokenizer_config:
    write_atomic(directory / TOKENIZER_CONFIG,
                 json.dumps(tokenizer_config, indent=2, ensure_ascii=False))


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
  """The absolute path (or URL) of `dst`, which must not exist (or be an empty dir) unless
  `overwrite`."""
  path = as_path(dst)
  if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
    raise FileExistsError(f"{path} already exists; choose another destination (or overwrite)")
  return os.fspath(path)


@contextlib.contextmanager
def atomic_file(dst: str, overwrite: bool = False):
  """Yields a temporary local path beside `dst`, renamed to `dst` only when the block
  succeeds (and removed when it fails): a reader never finds a half-written file."""
  dst = check_destination(dst, overwrite)
  if is_remote(dst) or os.path.isdir(dst):
    raise ValueError(f"{dst}: expected a local file path")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)  # mkstemp creates files 0600
    os.replace(tmp, dst)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_directory(dst: str, overwrite: bool = False):
  """Yields a fresh temporary directory beside `dst`, renamed to `dst` only when the block
  succeeds: a failed conversion never leaves a half-written destination.

  Remote (gs://...): an object store has no directory rename (it would copy every object),
  so the block writes into `dst` itself and must write the file that makes it usable
  (config.json) last; a failure deletes what it wrote. `overwrite` deletes the old `dst`
  first."""
  dst = check_destination(dst, overwrite)
  if is_remote(dst):
    path = as_path(dst)
    if path.exists():
      path.rmtree()
    try:
      yield dst
    except BaseException:
      if path.exists():
        path.rmtree()
      raise
    return
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
