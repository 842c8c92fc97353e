"""infer/serve.py as a client sees it: the official `openai` client against a live server
(a subprocess on a free port) over a tiny run directory. Answers are checked against
infer.decode.generate of each prompt alone, never against the server's own output."""

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import flax.linen as nn
import httpx2
import jax
import jax.numpy as jnp
import numpy as np
import openai
import portpicker
import pytest

from infer.beam import beam_search
from infer.decode import generate_with_stats, layout_for
from infer.engine_loop import EngineLoop, Job
from infer.sampling import SamplingParams
from model import ModelConfig, Transformer, fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["def add(a, b):\n    return a + b\n", "the cat sat on the mat", "hello world " * 3]
WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "def", "add", "return"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
CFG = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=128, init_std=0.3)
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A run directory as training writes one, with a chat template: (path, params, tokenizer)."""
  import orbax.checkpoint as ocp
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  path = tmp_path_factory.mktemp("run")
  # Byte-level BPE, as SmolLM2's and Llama 3's: llguidance (response_format) reads it.
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(jax.jit(lambda k: Transformer(CFG).init(k, tokens, tokens)["params"])(
      jax.random.PRNGKey(0)))
  fields = {f: getattr(CFG, f) for f in CFG.__dataclass_fields__}
  (path / "config.json").write_text(json.dumps({"model": fields}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(path / "checkpoints" / "0" / "params"), params)
  # The reference's weights laid out once (infer/decode.py accepts them prepared).
  return str(path), fused.prepare(CFG, params, layout=layout_for(1, speculative=False)), tok


class Server:
  def __init__(self, workdir, log_path, *flags):
    self.port = portpicker.pick_unused_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = open(log_path, "w")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    self.proc = subprocess.Popen(
        [sys.executable, "infer/serve.py", "--checkpoint", workdir, "--port", str(self.port),
         "--model_name", "tiny", "--no-warmup", "--page_size", "16", "--prefill_chunk", "32",
         "--log_level", "warning",
         *flags], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
    self.log_path = log_path
    deadline = time.time() + 180
    while True:
      assert self.proc.poll() is None, self.output()
      try:
        if httpx2.get(self.url + "/health").status_code == 200:
          break
      except httpx2.TransportError:
        pass
      assert time.time() < deadline, "server did not come up:\n" + self.output()
      time.sleep(0.2)
    self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

  def output(self) -> str:
    with open(self.log_path) as f:
      return f.read()[-5000:]

  def metric(self, name: str) -> float:
    text = httpx2.get(self.url + "/metrics").text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith(name + " ")))

  def stop(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      self.proc.wait(timeout=60)
    self.log.close()


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
  s = Server(run[0], tmp_path_factory.mktemp("log") / "server.log", "--num_pages", "48",
             "--max_batch", "8", "--max_queue", "128")
  yield s
  s.stop()
  assert s.proc.returncode == 0, s.output()


def reference(run, prompt_ids, max_tokens, sampling=GREEDY, seed=0, eos=True):
  """(token ids, logprobs) of the prompt generated alone by the plain decode loop."""
  _, params, tok = run
  g = generate_with_stats(CFG, params, [prompt_ids], max_new_tokens=max_tokens,
                          sampling=sampling, seed=[seed], return_logprobs=True,
                          eos_ids=(tok.token_to_id("<|endoftext|>"),) if eos else ())
  return g.tokens[0], g.logprobs[0]


def encode(run, text):  # a plain prompt starts as a training document: after <|endoftext|>
  tok = run[2]
  return [tok.token_to_id("<|endoftext|>")] + tok.encode(text).ids


def finish(run, ids):
  return "stop" if ids[-1] == run[2].token_to_id("<|endoftext|>") else "length"


def test_completions_and_chat_stream_and_not(run, server):
  tok = run[2]
  ids, _ = reference(run, encode(run, "the cat sat"), 8)
  want = tok.decode(ids, skip_special_tokens=True)
  c = server.client
  r = c.completions.create(model="tiny", prompt="the cat sat", max_tokens=8, temperature=0)
  assert r.choices[0].text == want and r.choices[0].finish_reason == finish(run, ids)
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
      len(encode(run, "the cat sat")), len(ids))
  chunks = list(c.completions.create(model="tiny", prompt="the cat sat", max_tokens=8,
                                     temperature=0, stream=True,
                                     stream_options={"include_usage": True}))
  assert "".join(ch.choices[0].text for ch in chunks[:-1]) == want
  assert chunks[-2].choices[0].finish_reason == finish(run, ids)
  assert chunks[-1].usage.completion_tokens == len(ids)

  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
  prompt = tok.encode("system: be brief\nuser: hello\nassistant:").ids  # TEMPLATE by hand
  ids, _ = reference(run, prompt, 6)
  want = tok.decode(ids, skip_special_tokens=True)
  r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
  assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
  assert r.usage.prompt_tokens == len(prompt)
  chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                          temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
  assert chunks[-1].choices[0].finish_reason == finish(run, ids)
  assert [m.id for m in c.models.list().data] == ["tiny"]


def test_64_concurrent_requests_each_match_generate_alone(run, server):
  rng = np.random.default_rng(0)
  prompts = [" ".join(rng.choice(WORDS, rng.integers(1, 5))) + f" {i % 7}" for i in range(64)]
  budgets = rng.integers(1, 9, 64).tolist()

  def ask(i):
    return server.client.completions.create(model="tiny", prompt=prompts[i],
                                            max_tokens=budgets[i], temperature=0, logprobs=0)
  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    answers = list(pool.map(ask, range(64)))
  tok = run[2]
  for prompt, m, r in zip(prompts, budgets, answers):
    ids, lps = reference(run, encode(run, prompt), m)
    choice = r.choices[0]
    assert choice.text == tok.decode(ids, skip_special_tokens=True), prompt
    assert choice.logprobs.tokens == [tok.decode([t], skip_special_tokens=False) for t in ids]
    np.testing.assert_allclose(choice.logprobs.token_logprobs, lps, atol=1e-4)
    assert choice.finish_reason == finish(run, ids)

  # n samples with a seed: choice i is seed + i's sample.
  sampled = SamplingParams(temperature=1.0)
  r = server.client.completions.create(model="tiny", prompt="hello", max_tokens=6, n=2,
                                       seed=5, temperature=1.0)
  for i, choice in enumerate(r.choices):
    ids, _ = reference(run, encode(run, "hello"), 6, sampled, seed=5 + i)
    assert choice.index == i and choice.text == tok.decode(ids, skip_special_tokens=True)


def test_stop_strings_cut_the_text(run, server):
  tok = run[2]
  ids, _ = reference(run, encode(run, "hello"), 8, eos=False)
  text = tok.decode(ids, skip_special_tokens=True)
  stop = text[3:5]
  want = text[:text.find(stop)]
  for stream in (False, True):
    r = server.client.completions.create(model="tiny", prompt="hello", max_tokens=8,
                                         temperature=0, stop=[stop, "zzz"], stream=stream,
                                         extra_body={"ignore_eos": True})
    chunks = list(r) if stream else [r]
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_client_that_leaves_mid_stream_frees_its_pages(server):
  cancelled = server.metric("jaxllm_requests_cancelled_total")
  generated = server.metric("jaxllm_generated_tokens_total")
  stream = server.client.completions.create(model="tiny", prompt="the cat", max_tokens=120,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
  chunks = iter(stream)
  for _ in range(3):
    next(chunks)
  assert server.metric("jaxllm_pages_in_use") > 0
  stream.close()
  deadline = time.time() + 60
  while server.metric("jaxllm_pages_in_use") or server.metric("jaxllm_requests_running"):
    assert time.time() < deadline
    time.sleep(0.05)
  assert server.metric("jaxllm_requests_cancelled_total") == cancelled + 1
  assert server.metric("jaxllm_generated_tokens_total") - generated < 120
  text = httpx2.get(server.url + "/metrics").text
  for name in ("jaxllm_time_to_first_token_seconds_bucket", "jaxllm_inter_token_latency_"
               "seconds_count", "jaxllm_pages_free", "jaxllm_generated_tokens_per_second"):
    assert name in text
  assert server.client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage


def test_top_logprobs_match_a_plain_forward(run, server):
  """logprobs=N (completions) and top_logprobs=N (chat) carry each token's N likeliest
  alternatives: a plain forward over prompt + answer, log-softmax in numpy."""
  from infer import workdir as run_dir
  params, tok = run_dir.load_params(run[0]), run[2]  # the module's layout (run[1] is fused)
  prompt = encode(run, "the cat sat")
  ids, lps = reference(run, prompt, 6)
  full = np.asarray(prompt + ids)
  logits, _ = Transformer(CFG).apply({"params": params}, jnp.asarray(full[None]),
                                     jnp.arange(len(full))[None])
  z = np.asarray(logits[0], np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  rows = [logp[len(prompt) - 1 + i] for i in range(len(ids))]
  text = lambda t: tok.decode([int(t)], skip_special_tokens=False)

  r = server.client.completions.create(model="tiny", prompt="the cat sat", max_tokens=6,
                                       temperature=0, logprobs=3)
  got = r.choices[0].logprobs
  np.testing.assert_allclose(got.token_logprobs, lps, atol=1e-4)
  for top, row in zip(got.top_logprobs, rows):
    want = {}
    for j in np.argsort(-row, kind="stable")[:3]:  # the likelier first, as the server keeps
      want.setdefault(text(j), row[j])
    assert top.keys() == want.keys()
    np.testing.assert_allclose([top[k] for k in want], list(want.values()), atol=1e-4)

  messages = [{"role": "user", "content": "hello"}]
  prompt = tok.encode("user: hello\nassistant:").ids  # TEMPLATE by hand
  ids, _ = reference(run, prompt, 4)
  chunks = list(server.client.chat.completions.create(
      model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True,
      top_logprobs=2, stream=True))
  entries = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
             for e in ch.choices[0].logprobs.content]
  assert [e.token for e in entries] == [text(t) for t in ids]
  for e in entries:  # greedy: the sampled token is the likeliest alternative
    assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
    assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
    assert e.top_logprobs[1].logprob <= e.logprob


@pytest.mark.parametrize("path,body,param", [
    ("completions", "{not json", None),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, "model"),
    ("completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": "tiny", "prompt": "hi", "max_tokens": 200}, "max_tokens"),
    ("completions", {"model": "tiny", "prompt": "cat " * 200}, "prompt"),
    ("completions", {"model": "tiny", "prompt": [1, 500]}, "prompt"),
    ("completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"model": "tiny", "prompt": "hi", "echo": True}, "echo"),
    ("completions", {"model": "tiny", "prompt": "hi", "logprobs": 6}, "logprobs"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                          "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "bot", "content": "x"}]},
     "messages.0.role"),
    ("chat/completions", {"model": "tiny", "messages": [], "max_tokens": 2}, "messages"),
    ("completions", {"model": "tiny", "prompt": "hi", "response_format": {"type": "xml"}},
     "response_format.type"),
    ("completions", {"model": "tiny", "prompt": "hi", "num_beams": 2, "stream": True},
     "stream"),
    ("completions", {"model": "tiny", "prompt": "hi", "num_beams": 2, "n": 3}, "n"),
    ("completions", {"model": "tiny", "prompt": "hi", "num_beams": 2, "temperature": 0.7},
     "temperature"),
    ("completions", {"model": "tiny", "prompt": "hi", "num_beams": 2, "logprobs": 0},
     "logprobs"),
    ("completions", {"model": "tiny", "prompt": "hi", "length_penalty": 2.0},
     "length_penalty"),
    ("completions", {"model": "tiny", "prompt": "hi", "num_beams": 2, "max_tokens": 200},
     "max_tokens"),
])
def test_bad_requests_are_400_naming_the_field(server, path, body, param):
  content = body if isinstance(body, str) else json.dumps(body)
  r = httpx2.post(f"{server.url}/v1/{path}", content=content,
                  headers={"content-type": "application/json"})
  assert r.status_code == 400, r.text
  error = r.json()["error"]
  assert error["type"] == "invalid_request_error" and error["param"] == param
  assert param is None or error["message"].startswith(param + ":")
  assert server.client.completions.create(model="tiny", prompt="hi", max_tokens=1).usage


def test_beam_search_answers_as_beam_search_alone(run, server):
  """num_beams over HTTP: each prompt's n best beams as infer/beam.py gives them for that
  prompt alone (itself checked against transformers' generate in tests/test_beam.py), while
  the engine keeps serving sampled requests beside it."""
  _, params, tok = run
  eot = tok.token_to_id("<|endoftext|>")
  c = server.client
  texts = ["the cat", "def add(a"]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    beside = pool.submit(c.completions.create, model="tiny", prompt="hello", max_tokens=24,
                         temperature=0)
    r = c.completions.create(model="tiny", prompt=texts, max_tokens=10, temperature=0, n=2,
                             extra_body={"num_beams": 3, "length_penalty": 0.5})
    assert beside.result().choices[0].text == tok.decode(
        reference(run, encode(run, "hello"), 24)[0], skip_special_tokens=True)
  got = [(ch.text, ch.finish_reason) for ch in r.choices]
  want, n_tokens = [], 0
  for text in texts:
    beams = beam_search(CFG, params, [encode(run, text)], num_beams=3, max_new_tokens=10,
                        length_penalty=0.5, num_return_sequences=2, eos_ids=(eot,))
    for ids in beams.tokens[0]:
      want.append((tok.decode(ids, skip_special_tokens=True), finish(run, ids)))
      n_tokens += len(ids)
  assert got == want and r.usage.completion_tokens == n_tokens

  messages = [{"role": "user", "content": "hello"}]
  prompt = tok.encode("user: hello\nassistant:").ids  # TEMPLATE by hand
  r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                extra_body={"num_beams": 2, "early_stopping": "never"})
  ids = beam_search(CFG, params, [prompt], num_beams=2, max_new_tokens=6,
                    early_stopping="never", eos_ids=(eot,)).tokens[0][0]
  assert r.choices[0].message.content == tok.decode(ids, skip_special_tokens=True)


def test_response_format_constrains_every_choice(server):
  pattern = "(cat|mat|hello)( (sat|on|the)){1,3}"
  for stream in (False, True):
    r = server.client.completions.create(
        model="tiny", prompt="the", max_tokens=24, temperature=1.0, n=3, seed=1, stream=stream,
        extra_body={"response_format": {"type": "regex", "regex": pattern}})
    if stream:
      chunks = [c.choices[0] for c in r if c.choices]
      texts = ["".join(c.text for c in chunks if c.index == i) for i in range(3)]
    else:
      texts = [c.text for c in r.choices]
    for text in texts:
      assert re.fullmatch(pattern, text.strip()), texts


def test_full_queue_is_429_and_sigterm_drains_then_exits_0(run, tmp_path):
  s = Server(run[0], tmp_path / "server.log", "--num_pages", "16", "--max_batch", "1",
             "--max_queue", "2")
  try:
    results = {}

    def stream(name):  # ignore_eos: each runs its whole budget, one at a time
      chunks = list(s.client.completions.create(
          model="tiny", prompt=name, max_tokens=20, temperature=0, stream=True,
          stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
      results[name] = chunks

    first = s.client.completions.create(model="tiny", prompt="cat", max_tokens=120,
                                        temperature=0, stream=True,
                                        stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True})
    first_chunks = iter(first)
    head = [next(first_chunks)]  # running: the one slot is taken
    threads = [threading.Thread(target=stream, args=(w,)) for w in ("hello", "world")]
    for t in threads:
      t.start()
    deadline = time.time() + 30
    while s.metric("jaxllm_requests_waiting") < 2:
      assert time.time() < deadline, s.output()
      time.sleep(0.02)
    with pytest.raises(openai.RateLimitError, match="max_queue"):
      s.client.completions.create(model="tiny", prompt="mat", max_tokens=2)

    s.proc.send_signal(signal.SIGTERM)  # the running one and both waiting ones still finish
    rest = list(first_chunks)
    for t in threads:
      t.join(timeout=120)
    assert s.proc.wait(timeout=120) == 0, s.output()
  finally:
    s.stop()
  results["cat"] = head + rest
  for name, budget in (("cat", 120), ("hello", 20), ("world", 20)):
    assert results[name][-1].usage.completion_tokens == budget
    assert results[name][-2].choices[0].finish_reason == "length"


class _FlakyEngine:
  """Just what EngineLoop uses of infer.engine.Engine: two slots, the i-th token of every
  request is i, and a step with a prompt [666] in its batch raises."""

  def __init__(self):
    self.requests, self.waiting, self.running = {}, [], []
    self.allocator = type("Pool", (), {"num_used": 0, "num_free": 8})()
    self.num_preemptions, self.next_id = 0, 0

  def add_request(self, prompt, *, max_new_tokens, sampling, seed, eos_ids, constraint=None,
                  top_logprobs=0):
    if prompt == [0]:
      raise ValueError("prompt: no")
    self.next_id += 1
    r = type("Request", (), dict(id=self.next_id, prompt=prompt, budget=max_new_tokens,
                                  output=[], logprobs=[], top_logprobs=top_logprobs, top=[],
                                  finished=False))()
    self.requests[r.id] = r
    self.waiting.append(r)
    return r.id

  def has_work(self):
    return bool(self.waiting or self.running)

  def cancel(self, rid):
    r = self.requests.pop(rid)
    for queue in (self.waiting, self.running):
      if r in queue:
        queue.remove(r)

  def step(self):
    while self.waiting and len(self.running) < 2:
      self.running.append(self.waiting.pop(0))
    if any(r.prompt == [666] for r in self.running):
      raise RuntimeError("device on fire")
    events = []
    for r in list(self.running):
      r.output.append(len(r.output))
      r.logprobs.append(-1.0)
      events.append((r.id, [r.output[-1]]))
      if len(r.output) == r.budget:
        r.finished = True
        self.running.remove(r)
    return events


def test_an_engine_failure_fails_only_the_requests_it_touched():

  async def scenario(loop):
    aloop = asyncio.get_running_loop()
    job = lambda prompt, n=3: Job(prompt=prompt, max_new_tokens=n, sampling=GREEDY, seed=0,
                                  index=0, eos_ids=(), queue=asyncio.Queue(), loop=aloop)

    async def tokens(j):
      out = []
      while True:
        e = await j.queue.get()
        if e.error:
          return e.status
        out += e.tokens
        if e.finished:
          return out
    bad_input, fire, later = job([0]), job([666]), job([1], n=4)
    loop.submit([bad_input, fire])
    assert await tokens(bad_input) == 400 and await tokens(fire) == 500
    loop.submit([later])
    assert await tokens(later) == [0, 1, 2, 3]

  loop = EngineLoop(_FlakyEngine(), max_queue=4)
  loop.start()
  try:
    asyncio.run(scenario(loop))
    assert loop.alive() and loop.failed == 2 and loop.engine.requests == {}
  finally:
    loop.stop()
