"""Structured output: generation constrained to a JSON schema or a regular expression.

The grammar runs on the host, the mask on the device. Before each sampled token, a row's
`Matcher` says which tokens keep its output a prefix of the grammar's language, as a packed
bitmask int32[B, ceil(V/32)] (bit j of word w allows token 32w + j); the jitted sampler unpacks
it and sets every other logit to -inf before any other filter (infer/sampling.py
`apply_bitmask`). The sampled token is then fed back to the matcher. Once the grammar is
complete the mask allows only EOS, so a constrained row ends like any other row. Rows without
a constraint get an all-ones mask.

The matchers are llguidance's (guidance-ai; an Earley parser over a lexer, with the token mask
walked over a trie of the vocabulary). Of the three libraries made for this (llguidance,
xgrammar, outlines-core) it fits a jitted JAX sampler best:
- it writes each mask straight into a numpy int32 bitmask, the very layout our jitted step
  takes, with the GIL released and rows computed in parallel (`LLExecutor`), so the host can
  prepare step n's mask while the device runs step n's forward (infer/decode.py);
- a grammar needs no pass over the vocabulary before its first token (masks are computed
  lazily, about a millisecond each for SmolLM2's 49k tokens), so every request can bring its
  own schema; outlines-core first builds a DFA index over the whole vocabulary for each
  regex (a JSON schema becomes one regex, so no recursive schemas);
- it depends on nothing (xgrammar 0.2.9 requires torch, triton and transformers) and is built
  from a Hugging Face `tokenizers` JSON, which every loader (infer/loaders.py) gives us;
- a schema or regex it cannot compile comes back as a message we can show.

  compiler = GrammarCompiler(model.tokenizer, model.cfg.vocab_size, model.eos_ids)
  constraint = compiler.json_schema({"type": "object", ...})   # or .regex(r"\\d{3}-[a-z]{4}")
  generate(cfg, params, prompts, constraint=constraint, eos_ids=model.eos_ids, ...)
  engine.add_request(prompt, constraint=constraint, ...)

JSON is generated compact (", " and ": " between items, no other whitespace: a small model
let loose on flexible whitespace may emit newlines until it runs out of tokens); a schema's
"x-guidance" key overrides that (llguidance's JSON options). A regex's \\d, \\w and \\s are
ASCII, as in Python's re.ASCII and JSON Schema "pattern"s.
"""

import dataclasses
import json
from typing import Any, Sequence

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def bitmask_width(vocab_size: int) -> int:
  return -(-vocab_size // 32)


@dataclasses.dataclass(frozen=True, eq=False)
class Constraint:
  """A checked grammar for requests to share; each request parses with its own `matcher()`."""
  grammar: str  # llguidance's serialized grammar
  source: str  # what it was built from, for messages
  eos_ids: tuple[int, ...]  # the tokens its mask allows once the grammar is complete
  tokenizer: llguidance.LLTokenizer
  executor: llguidance.LLExecutor

  def matcher(self) -> "Matcher":
    return Matcher(self)


class Matcher:
  """One row's parse: which tokens may come next, and the tokens that came."""

  def __init__(self, constraint: Constraint):
    self.constraint = constraint
    self.ll = llguidance.LLMatcher(constraint.tokenizer, constraint.grammar, log_level=0)
    if self.ll.is_error():  # a checked grammar compiles; this would be llguidance's fault
      raise RuntimeError(f"{constraint.source}: {self.ll.get_error()}")

  def consume(self, token: int):
    """Advances past a sampled token. The sampler only draws tokens the mask allowed, so a
    rejection means the mask and the token disagree: an error, never silently ignored."""
    if not self.ll.consume_token(int(token)):
      raise RuntimeError(f"{self.constraint.source}: token {token} was not allowed here "
                         f"({self.ll.get_error()})")

  @property
  def stopped(self) -> bool:
    """The grammar is complete and admits nothing more (its mask allows only EOS)."""
    return self.ll.is_stopped()


def bitmask(rows: Sequence[Matcher | None], vocab_size: int) -> np.ndarray:
  """int32[B, ceil(V/32)]: each row's allowed next tokens (all of them for a row without a
  matcher). Rows sharing an executor are computed in parallel, without the GIL."""
  mask_BW = np.full((len(rows), bitmask_width(vocab_size)), -1, np.int32)
  by_executor: dict[int, tuple[llguidance.LLExecutor, list]] = {}
  for i, m in enumerate(rows):
    if m is not None:
      ex = m.constraint.executor
      by_executor.setdefault(id(ex), (ex, []))[1].append((m.ll, i))
  for ex, pairs in by_executor.values():
    llg_numpy.fill_next_token_bitmask_par(ex, pairs, mask_BW)
  return mask_BW


class GrammarCompiler:
  """Builds `Constraint`s over one tokenizer and a model's vocabulary of `vocab_size` logits
  (which may be padded past the tokenizer's ids: the padding is never allowed)."""

  def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]):
    """tokenizer: a `tokenizers.Tokenizer`; eos_ids: what ends a generation."""
    self.eos_ids = tuple(int(e) for e in eos_ids)
    if not self.eos_ids:
      raise ValueError("structured output needs an EOS id: a constrained row ends with EOS "
                       "once its grammar is complete")
    n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tok > vocab_size:
      raise ValueError(f"the tokenizer has {n_tok} tokens but the model only {vocab_size} "
                       "logits (ModelConfig.vocab_size)")
    self.vocab_size = vocab_size
    self.tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                            eos_token=list(self.eos_ids))
    self.executor = llguidance.LLExecutor()

  def _checked(self, grammar: str, source: str) -> Constraint:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, self.tokenizer)
    if is_error:  # without the echo of the grammar llguidance wraps a regex in
      raise ValueError(f"{source}: {messages[0].split(chr(10) + '   1 | ')[0].strip()}")
    return Constraint(grammar=grammar, source=source, eos_ids=self.eos_ids,
                      tokenizer=self.tokenizer, executor=self.executor)

  def json_schema(self, schema: dict | str, field: str = "json_schema") -> Constraint:
    """Output that parses as JSON and validates against `schema` (a dict or JSON text).
    `field` names where the schema came from in error messages."""
    if isinstance(schema, str):
      try:
        schema = json.loads(schema)
      except json.JSONDecodeError as e:
        raise ValueError(f"{field}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
      raise ValueError(f"{field}: a JSON schema is an object, got {type(schema).__name__}")
    try:
      grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
      raise ValueError(f"{field}: {e}") from None
    return self._checked(grammar, field)

  def regex(self, pattern: str, field: str = "regex") -> Constraint:
    """Output that matches `pattern` in full (\\d, \\w, \\s ASCII, as re.ASCII)."""
    if not isinstance(pattern, str):
      raise ValueError(f"{field}: a regex is a string, got {type(pattern).__name__}")
    lark = f"start: /{llguidance.regex_to_lark(pattern, 'dws')}/"
    return self._checked(llguidance.LLMatcher.grammar_from_lark(lark), f"{field} {pattern!r}")

  def response_format(self, response_format: dict[str, Any] | None) -> Constraint | None:
    """OpenAI's `response_format`: {"type": "text"} (or None) is unconstrained;
    {"type": "json_object"} any JSON object; {"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}} that schema; and, beyond OpenAI's, {"type": "regex",
    "regex": "..."}."""
    if response_format is None:
      return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
      return None
    if kind == "json_object":
      return self.json_schema({"type": "object"}, "response_format")
    if kind == "json_schema":
      spec = response_format.get("json_schema")
      if not isinstance(spec, dict) or "schema" not in spec:
        raise ValueError('response_format.json_schema: expected {"name": ..., "schema": '
                         f"{{...}}}}, got {spec!r}")
      return self.json_schema(spec["schema"], "response_format.json_schema.schema")
    if kind == "regex":
      return self.regex(response_format.get("regex"), "response_format.regex")
    raise ValueError(f"response_format.type must be one of text, json_object, json_schema, "
                     f"regex; got {kind!r}")
