"""One completion's text as its tokens arrive: incremental detokenization and stop strings.

Decoding token by token loses what a tokenizer's decoder does across tokens (Metaspace and
byte-level decoders strip the first token's leading space; a UTF-8 character may span
tokens). As in text-generation-inference, each step decodes a short window twice, up to the
previous token and up to the new one, and emits the difference, holding it back while it
ends in an incomplete character. Text that could be the start of a stop string is held back
too, so a stream never sends what the stop string then cuts.
"""

import dataclasses


@dataclasses.dataclass
class Delta:
  text: str
  tokens: list[int]  # the tokens this delta consumed (its text may lag behind them)
  logprobs: list[float]
  top_logprobs: list = dataclasses.field(default_factory=list)  # per token: (id, logprob) pairs


class StreamText:
  def __init__(self, tokenizer, *, stop: tuple[str, ...] = (), eos_ids=()):
    self.tokenizer, self.stop, self.eos_ids = tokenizer, tuple(s for s in stop if s), eos_ids
    self.ids: list[int] = []
    self.logprobs: list[float] = []
    self.top_logprobs: list = []  # per token, when asked for
    self.text = ""
    self.sent = 0  # characters of text already emitted
    self.prefix = self.read = 0  # the decode window: ids[prefix:read] is already text
    self.finish_reason: str | None = None  # "stop" or "length" once done

  def _decode_next(self) -> str:
    decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
    before = decode(self.ids[self.prefix:self.read])
    after = decode(self.ids[self.prefix:])
    if len(after) <= len(before) or after.endswith("\ufffd"):
      return ""  # nothing yet, or half a character
    self.prefix, self.read = self.read, len(self.ids)
    return after[len(before):]

  def _flush(self) -> str:
    """What the window still holds back (an incomplete character at the very end)."""
    rest = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
    before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
    return rest[len(before):]

  def add(self, tokens, logprobs, engine_finished: bool, top_logprobs=()) -> Delta:
    """Takes new tokens (until a stop string ends the text) and returns what to emit;
    `engine_finished`: the engine generated its last token (EOS or max_tokens);
    `top_logprobs`: per token, its top (id, log-probability) pairs, if asked for."""
    taken = 0
    for tok, lp in zip(tokens, logprobs):
      self.ids.append(tok)
      self.logprobs.append(lp)
      if top_logprobs:
        self.top_logprobs.append(top_logprobs[taken])
      taken += 1
      self.text += self._decode_next()
      cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
      if cut >= 0:
        self.text, self.finish_reason = self.text[:cut], "stop"
        break
    if self.finish_reason is None and engine_finished:
      self.text += self._flush()
      self.finish_reason = "stop" if self.ids and self.ids[-1] in self.eos_ids else "length"
    end = len(self.text)
    if self.finish_reason is None:  # a stop string may be starting: hold it back
      end -= max((k for s in self.stop for k in range(1, len(s))
                  if self.text.endswith(s[:k])), default=0)
    delta = Delta(self.text[self.sent:max(end, self.sent)], list(tokens[:taken]),
                  list(logprobs[:taken]), list(top_logprobs[:taken]))
    self.sent = max(end, self.sent)
    return delta
