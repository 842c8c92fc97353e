"""The paged allocator and the continuous-batching engine."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.decode import generate, generate_with_stats
from infer.engine import Engine, EngineConfig
from infer.pages import OutOfPages, PageAllocator, chain_hash
from infer.sampling import SamplingParams
from model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=80, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                  max_seq_len=128, init_std=0.3)
GREEDY = SamplingParams(temperature=0)
SMALL = EngineConfig(num_pages=64, page_size=4, max_batch=4, prefill_chunk=8, prefill_rows=1)


@pytest.fixture(scope="module")
def params():
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda key: Transformer(CFG).init(key, tokens, tokens)["params"])
  return nn.unbox(init(jax.random.PRNGKey(0)))


# ------------------------------------------------------------------------------ allocator


def test_allocator_conserves_pages_and_refuses_double_free():
  alloc = PageAllocator(num_pages=9, page_size=4)
  rng = np.random.default_rng(0)
  held = []
  for _ in range(500):
    if held and (rng.random() < 0.5 or alloc.num_free == 0):
      alloc.release(held.pop(rng.integers(len(held))))
    elif rng.random() < 0.2 and held:
      page = held[rng.integers(len(held))]
      alloc.retain(page)
      held.append(page)
    else:
      held.append(alloc.allocate())
    alloc.check()
    assert alloc.num_free + alloc.num_used == alloc.capacity == 8
    assert 0 not in held  # the null page is never handed out
  for page in held:
    alloc.release(page)
  alloc.check()
  page = alloc.allocate()
  alloc.release(page)
  with pytest.raises(ValueError, match="double free"):
    alloc.release(page)
  for _ in range(8):
    alloc.allocate()
  with pytest.raises(OutOfPages):
    alloc.allocate()


def test_prefix_keys_and_copy_on_write():
  alloc = PageAllocator(num_pages=6, page_size=2)
  a = alloc.allocate()
  key = chain_hash(b"", [1, 2])
  alloc.register(a, key)
  assert alloc.lookup(key) == a and alloc.lookup(chain_hash(b"", [1, 3])) is None
  assert chain_hash(key, [3, 4]) != chain_hash(chain_hash(b"", [9, 9]), [3, 4])  # a chain
  assert alloc.copy_on_write(a) == (a, a)  # sole owner: write in place
  alloc.retain(a)
  fresh, src = alloc.copy_on_write(a)
  assert src == a and fresh != a and alloc.refcount[a] == 1 and alloc.refcount[fresh] == 1
  alloc.release(a)  # free, but still cached under its key ...
  assert alloc.lookup(key) == a and alloc.refcount[a] == 0
  alloc.retain(a)  # ... so a later request revives it
  assert alloc.refcount[a] == 1
  alloc.release(a)
  for _ in range(alloc.num_free):  # reusing the page forgets its key
    alloc.allocate()
  assert alloc.lookup(key) is None
  alloc.check()


# ------------------------------------------------------------------------------ engine


def _requests(seed, n, lengths=(3, 30), new=(2, 12)):
  rng = np.random.default_rng(seed)
  return [(rng.integers(1, CFG.vocab_size, rng.integers(*lengths)).tolist(),
           int(rng.integers(*new))) for _ in range(n)]


def _run(engine, requests, check=None, **kw):
  ids = [engine.add_request(p, max_new_tokens=m, **kw) for p, m in requests]
  while engine.has_work():
    engine.step()
    engine.allocator.check()
    for r in engine.running:  # a table holds only the request's own (or shared) pages
      assert all(engine.allocator.refcount[p] >= 1 for p in r.pages)
      assert len(set(r.pages)) == len(r.pages) and 0 not in r.pages
    if check is not None:
      check(engine)
  assert engine.allocator.num_used == 0  # everything freed at the end
  return [engine.requests[i].output for i in ids]


@pytest.fixture(scope="module")
def workload(params):
  requests = _requests(0, 10)
  want = generate(CFG, params, [p for p, _ in requests], max_new_tokens=[m for _, m in requests],
                  sampling=GREEDY)
  return requests, want


def test_batch_equals_each_request_alone(params, workload):
  requests, want = workload
  got = _run(Engine(CFG, params, SMALL), requests, sampling=GREEDY)
  assert got == want  # the contiguous-cache decode loop, batched
  for (prompt, m), out in zip(requests[:3], want[:3]):
    assert _run(Engine(CFG, params, SMALL), [(prompt, m)], sampling=GREEDY)[0] == out


def test_small_pool_preempts_and_still_finishes_everything(params, workload):
  requests, want = workload
  engine = Engine(CFG, params, EngineConfig(num_pages=13, page_size=4, max_batch=4,
                                            prefill_chunk=8))
  assert _run(engine, requests, sampling=GREEDY) == want
  assert engine.num_preemptions > 0
  assert engine.allocator.peak_used <= 12


def test_page_waste_counts_the_empty_slots_of_pages_in_use(params, workload):
  requests, want = workload  # random prompts: no page is shared
  totals = {"used": 0, "held": 0}

  def count(engine):
    totals["used"] += engine.allocator.num_used * engine.config.page_size
    totals["held"] += sum(r.computed for r in engine.running)
  engine = Engine(CFG, params, SMALL)
  assert _run(engine, requests, check=count, sampling=GREEDY) == want
  assert 0 < engine.page_waste < 0.5
  assert engine.page_waste == pytest.approx(1 - totals["held"] / totals["used"])
  one = Engine(CFG, params, dataclasses.replace(SMALL, page_size=1, num_pages=256))
  assert _run(one, requests, sampling=GREEDY) == want
  assert one.page_waste == 0.0  # one-token pages are written as soon as they are taken


def test_long_prompts_are_chunked_between_decode_steps(params):
  engine = Engine(CFG, params, SMALL)
  short = engine.add_request([5, 6, 7], max_new_tokens=20, sampling=GREEDY)
  engine.step()
  engine.step()
  long = engine.add_request(list(range(1, 41)), max_new_tokens=3, sampling=GREEDY)
  decoded_while_prefilling = 0
  while not engine.requests[long].output:
    events = dict(engine.step())
    decoded_while_prefilling += short in events
  assert decoded_while_prefilling >= 4  # 40 prompt tokens in chunks of 8: 5 steps
  engine.run()


def test_shared_prefix_pages_are_refcounted_and_copied_on_write(params):
  engine = Engine(CFG, params, SMALL)
  prefix = list(range(10, 22))  # three full pages of 4
  a = engine.add_request(prefix + [1, 2], max_new_tokens=4, sampling=GREEDY)
  while engine.requests[a].computed < 12:
    engine.step()
  b = engine.add_request(prefix + [3], max_new_tokens=4, sampling=GREEDY)
  c = engine.add_request(prefix, max_new_tokens=4, sampling=GREEDY)  # all pages cached
  engine.step()
  ra, rb, rc = (engine.requests[i] for i in (a, b, c))
  assert rb.cached_tokens == 12 and rc.cached_tokens == 11  # c recomputes its last token
  assert rb.pages[:3] == ra.pages[:3]
  assert rc.pages[:2] == ra.pages[:2] and rc.pages[2] != ra.pages[2]  # copied on write
  assert [engine.allocator.refcount[p] for p in ra.pages[:3]] == [3, 3, 2]
  engine.run()
  want = generate(CFG, params, [prefix + [1, 2], prefix + [3], prefix], max_new_tokens=4,
                  sampling=GREEDY)
  assert [engine.requests[i].output for i in (a, b, c)] == want


def test_requests_never_read_pages_they_do_not_own(params, workload):
  """After every step, NaN goes into every free page and every page of a victim request:
  the others must not notice (NaN spreads through any read, even a masked one, unless the
  attention ignores the slot)."""
  requests, want = workload
  engine = Engine(CFG, params, EngineConfig(num_pages=40, page_size=4, max_batch=4,
                                            prefill_chunk=8, prefix_caching=False))
  victim = engine.add_request(list(range(60, 75)), max_new_tokens=30, sampling=GREEDY)

  def poison(engine):
    bad = engine.allocator.refcount == 0
    bad[0] = False  # the null page holds only padding
    if not engine.requests[victim].finished:
      bad[engine.requests[victim].pages] = True
    fill = lambda x: jnp.where(jnp.asarray(bad)[None, :, None, None], jnp.nan, x)
    k_pages, v_pages, *scales = engine.pools
    engine.pools = (tuple(map(fill, k_pages)), tuple(map(fill, v_pages)), *scales)

  assert _run(engine, requests[:6], check=poison, sampling=GREEDY) == want[:6]


def test_sampled_requests_match_the_decode_loop_with_the_same_seeds(params, workload):
  requests, _ = workload
  requests = requests[:4]
  settings = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=8),
              SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.2), GREEDY]
  engine = Engine(CFG, params, SMALL)
  ids = [engine.add_request(p, max_new_tokens=m, sampling=s, seed=10 + i)
         for i, ((p, m), s) in enumerate(zip(requests, settings))]
  done = engine.run()
  want = generate(CFG, params, [p for p, _ in requests], max_new_tokens=[m for _, m in requests],
                  sampling=settings, seed=[10, 11, 12, 13])
  assert [done[i].tokens for i in ids] == want


def test_logprobs_match_the_decode_loop(params, workload):
  requests, _ = workload
  requests = requests[:3]
  settings = [GREEDY, SamplingParams(temperature=0.8), SamplingParams(temperature=1.3)]
  engine = Engine(CFG, params, SMALL)
  ids = [engine.add_request(p, max_new_tokens=m, sampling=s, seed=i)
         for i, ((p, m), s) in enumerate(zip(requests, settings))]
  done = engine.run()
  want = generate_with_stats(CFG, params, [p for p, _ in requests],
                             max_new_tokens=[m for _, m in requests], sampling=settings,
                             seed=[0, 1, 2], return_logprobs=True)
  assert [done[i].tokens for i in ids] == want.tokens
  for i, lps in zip(ids, want.logprobs):
    np.testing.assert_allclose(done[i].logprobs, lps, atol=1e-5)


@pytest.mark.parametrize("prompt_lookup", [0, 2])
def test_top_logprobs_match_a_plain_forward(params, workload, prompt_lookup):
  """Each output token's top-N alternatives: log_softmax(logits / T) of a plain forward over
  prompt + output, in numpy (speculating too: accepted drafts carry their own)."""
  requests, _ = workload
  settings = [GREEDY, SamplingParams(temperature=0.7), SamplingParams(temperature=1.3)]
  engine = Engine(CFG, params, dataclasses.replace(SMALL, top_logprobs=4,
                                                   prompt_lookup=prompt_lookup))
  asked = [3, 0, 4]
  ids = [engine.add_request(p, max_new_tokens=m, sampling=s, seed=i, top_logprobs=n)
         for i, ((p, m), s, n) in enumerate(zip(requests[:3], settings, asked))]
  done = engine.run()
  for rid, (prompt, _), sp, n in zip(ids, requests, settings, asked):
    c = done[rid]
    if not n:
      assert c.top_logprobs == []
      continue
    assert [len(top) for top in c.top_logprobs] == [n] * len(c.tokens)
    full = np.asarray(prompt + c.tokens)
    logits, _ = Transformer(CFG).apply({"params": params}, jnp.asarray(full[None]),
                                       jnp.arange(len(full))[None])
    z = np.asarray(logits[0], np.float64) / (sp.temperature or 1.0)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
        -1, keepdims=True)
    for i, top in enumerate(c.top_logprobs):
      row = logp[len(prompt) - 1 + i]
      want = np.argsort(-row, kind="stable")[:n]
      assert [t for t, _ in top] == want.tolist()
      np.testing.assert_allclose([v for _, v in top], row[want], atol=1e-4)
    if sp.temperature == 0:  # greedy: the token is the most likely, its logprob the top one
      assert [top[0][0] for top in c.top_logprobs] == c.tokens
  with pytest.raises(ValueError, match="top_logprobs=5: this engine keeps at most 4"):
    engine.add_request([1, 2], max_new_tokens=2, top_logprobs=5)


def test_cancel_frees_the_pages_of_waiting_running_and_finished_requests(params, workload):
  requests, want = workload
  engine = Engine(CFG, params, dataclasses.replace(SMALL, max_batch=2))
  ids = [engine.add_request(p, max_new_tokens=m, sampling=GREEDY) for p, m in requests[:4]]
  engine.step()
  engine.step()
  running, waiting = ids[0], ids[3]
  assert engine.requests[running].pages and engine.requests[waiting] in engine.waiting
  engine.cancel(running)
  engine.cancel(waiting)
  assert running not in engine.requests and waiting not in engine.requests
  done = engine.run()
  assert [done[i].tokens for i in ids[1:3]] == want[1:3]  # the others are untouched
  assert engine.allocator.num_used == 0
  engine.cancel(ids[1])  # finished: only forgotten
  assert ids[1] not in engine.requests and not engine.has_work()


def test_impossible_requests_are_errors(params):
  engine = Engine(CFG, params, EngineConfig(num_pages=5, page_size=4, max_batch=2))
  with pytest.raises(ValueError, match="num_pages"):
    engine.add_request(list(range(20)), max_new_tokens=4)
  with pytest.raises(ValueError, match="max_seq_len"):
    engine.add_request(list(range(120)), max_new_tokens=20)


def test_pallas_paged_kernel_serves_the_same_tokens(params, workload):
  # attention_impl="pallas" runs the paged-attention kernel (interpreted on CPU) in the engine
  # and the flash kernel in training; the decode loop's contiguous cache stays on XLA.
  import dataclasses
  requests, want = workload
  cfg = dataclasses.replace(CFG, attention_impl="pallas")
  assert _run(Engine(cfg, params, SMALL), requests[:4], sampling=GREEDY) == want[:4]


def test_after_warmup_serving_compiles_nothing(params):
  from infer.engine import _device_step
  # Weights placed on a mesh, as a loaded checkpoint's are: each step's pools then come back
  # with that sharding, which jit tells apart from the freshly made pools' none.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  # max_seq_len 16 in pages of 4: table widths [4] only, three step shapes.
  engine = Engine(CFG, params, EngineConfig(num_pages=16, page_size=4, max_batch=2,
                                            prefill_chunk=8, max_seq_len=16))
  engine.warmup()
  compiled = _device_step._cache_size()
  for prompt in ([1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]):  # prefill alone, then mixed
    engine.add_request(prompt, max_new_tokens=3, sampling=GREEDY)
    engine.step()
  engine.run()
  assert _device_step._cache_size() == compiled
