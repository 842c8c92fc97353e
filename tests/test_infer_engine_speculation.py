"""The engine's one forward per step and its prompt-lookup speculation (infer/engine.py).

References: the contiguous-cache decode loop (infer/decode.generate), which neither packs rows
nor speculates, and the engine without speculation."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from infer import engine as engine_lib
from infer import step
from infer.decode import generate_with_stats
from infer.engine import Engine
from infer.sampling import SamplingParams
from tests.test_infer_engine import CFG, GREEDY, SMALL, _run, params  # noqa: F401  (a fixture)

SPEC = dataclasses.replace(SMALL, prompt_lookup=3, num_draft=4)
# Prompts that repeat themselves, so their own n-grams predict them (and random-weight models
# fall into loops that lookup then follows).
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8] * 3 + [1, 2, 3], [9, 10, 11, 9, 10, 11, 9], [40, 41],
           [20, 21, 22, 23, 24] * 4, list(range(50, 70)) + list(range(50, 60))]
NEW = [24, 30, 20, 12, 26]
SETTINGS = [GREEDY, SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=8),
            SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=0.8,
                                                                       repetition_penalty=1.3)]


def _serve(params, config, settings, seeds=range(5), eos_ids=()):
  engine = Engine(CFG, params, config, eos_ids=eos_ids)
  ids = [engine.add_request(p, max_new_tokens=m, sampling=s, seed=sd)
         for p, m, s, sd in zip(PROMPTS, NEW, settings, seeds)]
  done = engine.run()
  assert engine.allocator.num_used == 0
  return engine, [done[i] for i in ids]


@pytest.mark.parametrize("settings", [[GREEDY] * 5, SETTINGS], ids=["greedy", "sampled"])
def test_speculation_gives_the_tokens_of_plain_decoding(params, settings):
  """Exact and identical: each position samples with the key plain decoding would use there."""
  want = generate_with_stats(CFG, params, PROMPTS, max_new_tokens=NEW, sampling=settings,
                             seed=list(range(5)), return_logprobs=True)
  plain, plain_out = _serve(params, SMALL, settings)
  spec, spec_out = _serve(params, SPEC, settings)
  assert [c.tokens for c in plain_out] == want.tokens
  assert [c.tokens for c in spec_out] == want.tokens
  for c, lps in zip(spec_out, want.logprobs):  # one per emitted token
    np.testing.assert_allclose(c.logprobs, lps, atol=1e-5)
  assert plain.num_drafted == 0 and 0 < spec.num_accepted <= spec.num_drafted
  assert spec.num_steps <= plain.num_steps  # the longest request may accept no draft


def test_eos_inside_an_accepted_run_ends_the_request_there(params, monkeypatch):
  """Drafts from an oracle (plain decoding's own continuation, its third token wrong) are
  accepted up to the wrong one, and an EOS among the accepted ends the request right there."""
  prompt, new = PROMPTS[2], 40
  want = generate_with_stats(CFG, params, [prompt], max_new_tokens=new, sampling=GREEDY)
  ref = want.tokens[0] + [0] * SPEC.num_draft

  def oracle(tokens, lens, ngram, k, xp):
    drafts = np.array([ref[n - len(prompt):n - len(prompt) + k] for n in lens.tolist()])
    drafts[:, 2] = (drafts[:, 2] + 1) % CFG.vocab_size
    return drafts, np.full(len(lens), k)
  monkeypatch.setattr(engine_lib, "lookup_drafts", oracle)
  # Prefill gives token 0; each step then accepts 2 drafts and samples the third: 1-3, 4-6, ...
  at = next(i for i in range(1, new) if (i - 1) % 3 != 2 and ref[i] not in ref[:i])
  eos = ref[at]
  engine = Engine(CFG, params, SPEC, eos_ids=[eos])
  got = _run(engine, [(prompt, new)], sampling=GREEDY)
  assert got == generate_with_stats(CFG, params, [prompt], max_new_tokens=new, sampling=GREEDY,
                                    eos_ids=[eos]).tokens == [ref[:at + 1]]
  assert len(engine.requests[0].logprobs) == at + 1
  assert engine.num_accepted == 2 * (at // 3 + 1)  # (also those after the EOS)


def test_cached_pages_written_while_speculating_hold_the_right_entries(params):
  """A later request whose prompt is an earlier one's prompt and output reuses the pages the
  earlier one filled while verifying drafts (rejected drafts' entries overwritten)."""
  engine = Engine(CFG, params, SPEC)
  first = _run(engine, [(PROMPTS[0], 30)], sampling=GREEDY)[0]
  assert engine.num_accepted > 0
  prompt = PROMPTS[0] + first[:25]
  second = _run(engine, [(prompt, 10)], sampling=GREEDY)[0]
  assert engine.requests[1].cached_tokens >= 48  # 12 of its 13 pages came from the first
  assert second == generate_with_stats(CFG, params, [prompt], max_new_tokens=10,
                                       sampling=GREEDY).tokens[0]


def test_a_step_of_prefill_and_decode_rows_runs_one_forward(params, monkeypatch):
  """The weights are read once a step: one model forward in the traced step, whatever the mix
  (a config of its own, so the step is traced here, not taken from an earlier test's trace)."""
  calls, groups = [], []
  model_forward = step.model_forward
  monkeypatch.setattr(step, "model_forward",
                      lambda *a, **kw: calls.append(1) or model_forward(*a, **kw))
  device_step = engine_lib._device_step
  monkeypatch.setattr(engine_lib, "_device_step", lambda *a, **kw: groups.append(
      [g.tokens.shape for g in a[4]]) or device_step(*a, **kw))
  engine = Engine(dataclasses.replace(CFG, max_seq_len=120), params, SMALL)
  engine.add_request([5, 6, 7], max_new_tokens=8, sampling=GREEDY)
  engine.step()
  engine.add_request(list(range(1, 30)), max_new_tokens=2, sampling=GREEDY)
  calls.clear()
  engine.step()
  assert groups[-1] == [(SMALL.prefill_rows, SMALL.prefill_chunk), (SMALL.max_batch, 1)]
  assert calls == [1]


def test_all_greedy_steps_draw_no_random_numbers(params, monkeypatch):
  seen = []
  device_step = engine_lib._device_step
  monkeypatch.setattr(engine_lib, "_device_step",
                      lambda *a, **kw: seen.append((a, kw)) or device_step(*a, **kw))
  engine = Engine(CFG, params, SMALL)
  engine.add_request([5, 6, 7], max_new_tokens=2, sampling=GREEDY)
  engine.step()
  engine.add_request([8, 9], max_new_tokens=2, sampling=SamplingParams(temperature=1.0))
  engine.step()
  (greedy_args, greedy_kw), (mixed_args, mixed_kw) = seen
  assert greedy_kw["features"].greedy_only and not mixed_kw["features"].greedy_only

  def primitives(args, kw):
    jaxpr = jax.make_jaxpr(functools.partial(device_step, **kw))(*args)
    return str(jaxpr)
  assert "random_bits" not in primitives(greedy_args, greedy_kw)
  assert "random_bits" in primitives(mixed_args, mixed_kw)  # the Gumbel noise of sampling
