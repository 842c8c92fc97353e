"""Loading a run config: a configs/*.py file (or `configs/x.py:arg`, get_config's argument) plus
`--config.a.b=value` overrides.

ml_collections.config_flags does the same, but through absl flags, which would take over the
command line of every script (and pytest's); this keeps argparse, and the errors below.

An unknown key is an error naming the key and the valid keys beside it.
"""

import ast
import difflib
import importlib
import importlib.util
import inspect
import os

import ml_collections


class ConfigError(ValueError):
  pass


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """The config of `path`: "configs/x.py" calls its get_config(); "configs/x.py:arg" calls
  get_config("arg"), as ml_collections.config_flags does (configs/ladder.py:sft)."""
  path, colon, arg = path.partition(".py:")
  path = path + ".py" if colon else path
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_config = getattr(module, "get_config", None)
  if get_config is None:
    raise ConfigError(f"{path} defines no get_config()")
  takes_arg = bool(inspect.signature(get_config).parameters)
  if colon and not takes_arg:
    raise ConfigError(f"{path} takes no argument (its get_config() has none): use "
                      f"--config={path}")
  if takes_arg and not colon:
    raise ConfigError(f"{path} needs an argument: --config={path}:ARG "
                      f"({(get_config.__doc__ or '').strip().splitlines()[0]})")
  cfg = get_config(arg) if colon else get_config()
  cfg.lock()  # from here on, a misspelt key is an error rather than a silent new field
  return cfg


def _parse_value(text: str, current):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a bool, got {text!r}")
  if isinstance(current, str):
    return text
  value = ast.literal_eval(text)
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, (int, float)) and not isinstance(value, type(current)):
    raise ValueError(f"expected {type(current).__name__}, got {text!r}")
  return value


def set_key(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets cfg.<dotted> from a command-line string, keeping the default's type."""
  node, parts = cfg, dotted.split(".")
  for i, part in enumerate(parts):
    keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    if part not in keys:
      where = "config" + "".join(f".{p}" for p in parts[:i])
      near = difflib.get_close_matches(part, keys, n=3)
      hint = f" Did you mean {', '.join(near)}?" if near else ""
      raise ConfigError(f"unknown config key 'config.{dotted}'.{hint} "
                        f"Valid keys in {where}: {', '.join(sorted(keys))}")
    if i < len(parts) - 1:
      node = node[part]
  try:
    value = _parse_value(text, node[parts[-1]])
    with node.unlocked():
      node[parts[-1]] = value
  except (ValueError, SyntaxError, TypeError) as e:
    raise ConfigError(f"bad value for config.{dotted}: {e}") from None


def load_config(path: str, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  cfg = load_config_file(path)
  for key, text in overrides.items():
    set_key(cfg, key, text)
  return cfg


def split_overrides(argv: list[str]) -> tuple[dict[str, str], list[str]]:
  """Pulls `--config.a.b=v` (or `--config.a.b v`) out of argv; returns (overrides, rest)."""
  overrides, rest, i = {}, [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ConfigError(f"{arg} needs a value")
        value, i = argv[i + 1], i + 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
  out = {}
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def import_function(spec: str):
  """The function named by "package.module:function" (reward functions, data generators)."""
  module_name, colon, name = spec.partition(":")
  if not colon or not module_name or not name:
    raise ValueError(f"{spec!r} is not of the form 'package.module:function'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"cannot import {module_name!r} for {spec!r}: {e}") from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ValueError(f"{module_name!r} has no function {name!r}")
  return fn
