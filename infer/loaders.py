"""Everything generation needs from a model on disk, whatever its format.

  load_checkpoint(workdir)  a run directory of ours (infer/workdir.py)
  load_hf(directory)        a Hugging Face checkpoint directory (infer/hf.py)
  load_gguf(path)           a llama.cpp GGUF file (infer/gguf.py)

Each returns a `LoadedModel`: config, params, tokenizer, EOS/BOS ids and the chat template.
"""

import dataclasses
import functools
import importlib
from typing import Any

from infer.files import document_ids
from model import ModelConfig


@dataclasses.dataclass
class LoadedModel:
  cfg: ModelConfig
  params: Any
  tokenizer: Any  # tokenizers.Tokenizer
  eos_ids: tuple[int, ...] = ()
  bos_id: int | None = None  # prepended to plain prompts when the tokenizer does not
  chat_template: str | None = None
  tokenizer_config: dict = dataclasses.field(default_factory=dict)
  source: str = ""

  def encode(self, text: str) -> list[int]:
    ids = self.tokenizer.encode(text).ids
    if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
      ids = [self.bos_id] + ids
    return ids

  def encode_chat(self, text: str) -> list[int]:
    """The prompt the model was tuned on: the user message through its chat template."""
    if not self.chat_template:
      raise ValueError(f"{self.source} has no chat template (tokenizer_config.json "
                       "'chat_template'); drop --chat to use the prompt as plain text")
    return self.encode_messages([{"role": "user", "content": text}])

  def encode_messages(self, messages: list[dict]) -> list[int]:
    """A whole conversation ([{"role": ..., "content": ...}, ...]) through the chat template,
    ending where the assistant's reply begins."""
    return self.tokenizer.encode(self.render_messages(messages), add_special_tokens=False).ids

  def render_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation's text through the chat template. add_generation_prompt=False ends it
    right after the last message's content, for the model to continue that message
    (transformers' continue_final_message: the template's end-of-turn is cut off)."""
    from infer.chat import special_tokens
    rendered = self._render_chat(messages, add_generation_prompt=add_generation_prompt,
                                 **special_tokens(self.tokenizer_config))
    if add_generation_prompt or not messages:
      return rendered
    last = messages[-1]["content"].strip()
    if last not in rendered:
      raise ValueError(f"{self.source}: the chat template does not render the last message's "
                       "content as it is, so the message cannot be continued")
    return rendered[:rendered.rindex(last) + len(last)]

  @functools.cached_property
  def _render_chat(self):  # compiled once: a server renders every request with it
    from infer.chat import compile_chat
    if not self.chat_template:
      raise ValueError(f"{self.source} has no chat template (tokenizer_config.json "
                       "'chat_template')")
    return compile_chat(self.chat_template)


def load_checkpoint(workdir: str, step: int | None = None) -> LoadedModel:
  from infer import workdir as run_dir
  cfg = run_dir.load_model_config(workdir)
  tokenizer = run_dir.load_tokenizer(workdir)
  params = run_dir.load_params(workdir, cfg, step=step)
  config = run_dir.load_tokenizer_config(workdir)
  try:  # a prompt begins as training began each document
    bos, eos = document_ids(tokenizer, config)
  except ValueError:  # no EOS: generation runs to max_new_tokens
    bos, eos = None, None
  return LoadedModel(cfg=cfg, params=params, tokenizer=tokenizer,
                     eos_ids=() if eos is None else (eos,), bos_id=bos,
                     chat_template=config.get("chat_template"), tokenizer_config=config,
                     source=workdir)


def _converter(module: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise NotImplementedError(
        f"loading {what} needs {module.replace('.', '/')}.py, which is missing or failed to "
        f"import ({e})") from None


def _from_converted(loaded, path: str) -> LoadedModel:
  cfg, params, tokenizer, extra = loaded
  if tokenizer is None:
    raise ValueError(f"{path} has no tokenizer (tokenizer.json)")
  return LoadedModel(cfg=cfg, params=params, tokenizer=tokenizer,
                     eos_ids=tuple(extra.get("eos_token_ids") or ()),
                     # Their tokenizers add BOS themselves where the model expects one.
                     bos_id=None, chat_template=extra.get("chat_template"),
                     tokenizer_config=extra.get("tokenizer_config") or {}, source=path)


def load_hf(directory: str) -> LoadedModel:
  return _from_converted(_converter("infer.hf", "Hugging Face checkpoints").load_hf(directory),
                         directory)


def load_gguf(path: str) -> LoadedModel:
  return _from_converted(_converter("infer.gguf", "GGUF files").load_gguf(path), path)
