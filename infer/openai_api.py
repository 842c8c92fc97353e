"""The OpenAI wire format: request bodies (validated strictly) and the JSON we answer with.

Fields we do not implement are refused (400, naming the field) rather than ignored, so a
client never gets an answer to a question it did not ask. Beyond OpenAI's fields, `top_k`,
`min_p` and `repetition_penalty` map straight to SamplingParams, and `ignore_eos` generates
through EOS to max_tokens (for load tests), as vLLM accepts them.
"""

import time
import uuid
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from infer.sampling import SamplingParams
from infer.stream_text import Delta, StreamText


class APIError(Exception):
  """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": None}}


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
  include_usage: bool = False


class _Common(_Strict):
  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(1.0, ge=0, le=2)
  top_p: float = Field(1.0, gt=0, le=1)
  n: int = Field(1, ge=1, le=64)
  stream: bool = False
  stream_options: StreamOptions | None = None
  stop: str | Annotated[list[str], Field(max_length=4)] | None = None
  seed: int | None = None
  user: str | None = None
  presence_penalty: float = 0.0  # accepted only as their no-op default
  frequency_penalty: float = 0.0
  top_k: int = Field(0, ge=0)
  min_p: float = Field(0.0, ge=0, le=1)
  repetition_penalty: float = Field(1.0, gt=0)
  ignore_eos: bool = False
  # infer/structured.py reads it: text, json_object, json_schema, and our regex.
  response_format: dict[str, Any] | None = None
  # Beam search (infer/beam.py: transformers' generate(num_beams=..., do_sample=False)), as
  # vLLM's server takes it: the `n` best of `num_beams` beams per prompt, best first.
  num_beams: int = Field(1, ge=1, le=16)
  length_penalty: float = 1.0
  early_stopping: bool | Literal["never"] = False

  @pydantic.field_validator("presence_penalty", "frequency_penalty")
  @classmethod
  def _no_penalties(cls, v):
    if v:
      raise ValueError("not supported (only 0); repetition_penalty is")
    return v

  def sampling(self) -> SamplingParams:
    return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          min_p=self.min_p, repetition_penalty=self.repetition_penalty)

  def stops(self) -> tuple[str, ...]:
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

  def include_usage(self) -> bool:
    return self.stream_options is not None and self.stream_options.include_usage

  def check_beams(self) -> None:
    """Beam search is greedy and answers whole: a 400 naming the first field that asks for
    something else, or a beam field without num_beams > 1."""
    asked = self.model_fields_set
    if self.num_beams == 1:
      for field in ("length_penalty", "early_stopping"):
        if field in asked:
          raise APIError(400, f"{field}: applies to beam search; add num_beams > 1", field)
      return
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                "repetition_penalty": 1.0}
    for field, greedy in sampling.items():
      if field in asked and getattr(self, field) != greedy:
        why = "must be 0" if field == "temperature" else "does not apply"
        raise APIError(400, f"{field}: beam search is greedy ({field} {why} with num_beams "
                       "> 1)", field)
    for field in ("stream", "logprobs", "top_logprobs", "response_format", "seed"):
      value = getattr(self, field, None)
      if value is not None and value is not False:
        raise APIError(400, f"{field}: not supported with num_beams > 1", field)
    if self.n > self.num_beams:
      raise APIError(400, f"n: {self.n} choices asked of {self.num_beams} beams; n must be "
                     "<= num_beams", "n")


class CompletionRequest(_Common):
  # A string, a list of strings (a batch), token ids, or a list of those.
  prompt: str | list[str] | list[int] | list[list[int]]
  # The sampled token's log-probability and the `logprobs` most likely alternatives (<= 5, as
  # OpenAI's; the server keeps at most --max_top_logprobs).
  logprobs: int | None = Field(None, ge=0, le=5)

  def top_logprobs_wanted(self) -> int:
    return self.logprobs or 0

  def prompts(self) -> list[str | list[int]]:
    p = self.prompt
    return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class Message(_Strict):
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[TextPart]
  name: str | None = None

  def as_template_input(self) -> dict:
    text = self.content if isinstance(self.content, str) else "".join(
        p.text for p in self.content)
    return {"role": self.role, "content": text}


class ChatRequest(_Common):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=20)  # with logprobs, as OpenAI's

  @pydantic.model_validator(mode="after")
  def _top_needs_logprobs(self):
    if self.top_logprobs and not self.logprobs:
      raise ValueError("top_logprobs: needs logprobs: true")
    return self

  def top_logprobs_wanted(self) -> int:
    return self.top_logprobs or 0

  def budget(self) -> int | None:
    return self.max_completion_tokens or self.max_tokens


def parse(cls: type[_Strict], body) -> _Strict:
  """Validates a decoded JSON body; a bad one is a 400 naming the first bad field."""
  if not isinstance(body, dict):
    raise APIError(400, "the request body must be a JSON object")
  try:
    return cls.model_validate(body)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    # Union members appear in the location as type names ("list[int]"): leave them out.
    param = ".".join(str(p) for p in err["loc"] if isinstance(p, int)
                     or (p.isidentifier() and p not in ("str", "int", "float", "bool")))
    message = ("this server does not support the field" if err["type"] == "extra_forbidden"
               else err["msg"].removeprefix("Value error, "))
    raise APIError(400, f"{param}: {message}", param) from None


# ------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


class Format:
  """One endpoint's response shapes: `chunk` for a stream's pieces, `response` for the
  whole answer; with `logprobs`, each choice carries its sampled tokens' log-probabilities."""

  def __init__(self, kind: Literal["text_completion", "chat.completion"], model: str,
               tokenizer, logprobs: bool):
    self.kind, self.model, self.tokenizer, self.want_logprobs = kind, model, tokenizer, logprobs
    self.id = new_id("cmpl" if kind == "text_completion" else "chatcmpl")
    self.created = int(time.time())

  def _head(self, suffix: str = "") -> dict:
    return {"id": self.id, "object": self.kind + suffix, "created": self.created,
            "model": self.model}

  def _logprobs(self, tokens: list[int], logprobs: list[float], tops=(), offset: int = 0):
    """tops: per token, its top (token id, log-probability) pairs (none: no alternatives)."""
    if not self.want_logprobs:
      return None
    text = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)
    texts = [text(t) for t in tokens]
    tops = list(tops) or [()] * len(tokens)
    if self.kind == "chat.completion":
      entry = lambda s, lp: {"token": s, "logprob": lp, "bytes": list(s.encode())}
      return {"content": [entry(s, lp) | {"top_logprobs": [entry(text(t), v) for t, v in top]}
                          for s, lp, top in zip(texts, logprobs, tops)]}
    offsets = [offset + sum(len(s) for s in texts[:i]) for i in range(len(texts))]
    # As OpenAI's: a {token text: log-probability} object per position (tokens that decode to
    # the same text keep the likelier).
    alternatives = [{text(t): v for t, v in reversed(top)} if top else None for top in tops]
    return {"tokens": texts, "token_logprobs": list(logprobs),
            "top_logprobs": alternatives, "text_offset": offsets}

  def _choice(self, index: int, text: str, logprobs, finish: str | None,
              first: bool = False, final: bool = False) -> dict:
    if self.kind == "text_completion":
      return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    content = {"role": "assistant", "content": text}
    if not final:  # a delta: the role comes once, empty content is left out
      content = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
      return {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "message": content, "logprobs": logprobs, "finish_reason": finish}

  def chunk(self, index: int, delta: Delta, finish: str | None, first: bool,
            offset: int) -> dict:
    lp = (self._logprobs(delta.tokens, delta.logprobs, delta.top_logprobs, offset)
          if delta.tokens else None)
    return self._head(".chunk" if self.kind == "chat.completion" else "") | {
        "choices": [self._choice(index, delta.text, lp, finish, first=first)]}

  def usage_chunk(self, u: dict) -> dict:
    return self._head(".chunk" if self.kind == "chat.completion" else "") | {
        "choices": [], "usage": u}

  def response(self, choices: list[StreamText], u: dict) -> dict:
    return self._head() | {"choices": [
        self._choice(i, c.text, self._logprobs(c.ids, c.logprobs, c.top_logprobs),
                     c.finish_reason, final=True)
        for i, c in enumerate(choices)], "usage": u}
