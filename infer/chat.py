"""Chat templates: the Jinja template a model ships (HF `tokenizer_config.json`'s
`chat_template`, or GGUF's `tokenizer.chat_template`) rendered the way transformers'
`apply_chat_template` renders it, so prompts match what the model was tuned on.

    text = render_chat(template, [{"role": "user", "content": "Hi"}])
    ids = tokenizer.encode(text, add_special_tokens=False).ids
"""

import datetime
import json

from infer.files import TOKENIZER_CONFIG, as_path


def _raise(message):
  raise ValueError(f"chat template: {message}")


def _environment():
  # Sandboxed: a template comes from a downloaded file. trim_blocks/lstrip_blocks and
  # loopcontrols as in transformers, which the templates are written against.
  from jinja2.ext import loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[loopcontrols])
  env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent,
                                                                  ensure_ascii=False)
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


def compile_chat(template: str):
  """render(messages, *, add_generation_prompt=True, **variables) -> str, with the template
  compiled once (rendering many rows, as post-training data does, is then ~150x faster)."""
  if not template:
    raise ValueError("this model has no chat template")
  compiled = _environment().from_string(template)

  def render(messages: list[dict], *, add_generation_prompt: bool = True, **variables) -> str:
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           **variables)
  return render


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                **variables) -> str:
  """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]). Extra
  `variables` (bos_token, eos_token, tools, ...) are passed to the template."""
  return compile_chat(template)(messages, add_generation_prompt=add_generation_prompt,
                                **variables)


def load_tokenizer_config(directory: str) -> dict:
  """A workdir's (or HF dir's) tokenizer_config.json, {} if absent; its `chat_template`
  is what render_chat takes."""
  path = as_path(directory) / TOKENIZER_CONFIG
  return json.loads(path.read_text()) if path.is_file() else {}


def special_tokens(tokenizer_config: dict) -> dict:
  """bos_token/eos_token strings of a tokenizer_config, as templates expect them."""
  out = {}
  for key in ("bos_token", "eos_token"):
    value = tokenizer_config.get(key)
    out[key] = value.get("content", "") if isinstance(value, dict) else (value or "")
  return out
