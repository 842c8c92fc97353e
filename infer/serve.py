"""An OpenAI-compatible HTTP server on the continuous-batching engine (infer/engine.py).

  python infer/serve.py --checkpoint runs/tiny --port 8000
  python infer/serve.py --gguf ~/models/SmolLM2-135M-Instruct-Q8_0.gguf --max_batch 32

  POST /v1/completions, /v1/chat/completions  (stream: true for server-sent events;
                                              num_beams: K for beam search)
  GET  /v1/models, /health, /metrics          (/metrics: Prometheus text)

The engine runs on its own thread (infer/engine_loop.py); request handlers only queue work
and await tokens. Under pressure nothing is lost: more than --max_queue requests waiting is a
429; a bad request is a 400 naming the field; a client that goes away has its request
cancelled and its pages freed; an engine error fails the requests it touched, not the server;
SIGTERM stops taking connections, finishes every open request, then exits 0.
"""

import os
import sys

# As infer/generate.py: the repo root, not infer/, first on sys.path (infer/gguf.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402

import fastapi  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402

from infer.engine_loop import EngineLoop, Job, QueueFull  # noqa: E402
from infer.openai_api import (APIError, ChatRequest, CompletionRequest, Format,  # noqa: E402
                              parse, usage)
from infer import beam, structured  # noqa: E402
from infer.stream_text import StreamText  # noqa: E402
from model import kv_cache  # noqa: E402

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", metavar="WORKDIR", help="a run directory")
  src.add_argument("--hf", metavar="DIR", help="a Hugging Face Llama directory")
  src.add_argument("--gguf", metavar="FILE", help="a llama.cpp GGUF file")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--model_name", help="the id clients name (default: the path's last part)")
  ap.add_argument("--host", default="127.0.0.1")
  ap.add_argument("--port", type=int, default=8000)
  ap.add_argument("--num_pages", type=int, default=512, help="KV-cache pages, null page "
                  "included")
  ap.add_argument("--page_size", type=int, default=16)
  ap.add_argument("--max_batch", type=int, default=16, help="requests running at once")
  ap.add_argument("--max_queue", type=int, default=256, help="requests waiting before 429")
  ap.add_argument("--prefill_chunk", type=int, default=128)
  ap.add_argument("--max_seq_len", type=int, default=0, help="0: the model's")
  ap.add_argument("--kv_cache_dtype", choices=kv_cache.CACHE_DTYPES, default=None,
                  help="KV pages' dtype (default: the compute dtype); int8: a scale per token")
  ap.add_argument("--prompt_lookup", type=int, default=0, metavar="N",
                  help="speculate: each decoding request drafts tokens that followed the latest "
                  "earlier match of its last N-gram (at most N) in its own context; exact, the "
                  "same tokens as without. 0: off")
  ap.add_argument("--num_draft", type=int, default=4, metavar="K",
                  help="draft tokens per request and step with --prompt_lookup")
  ap.add_argument("--max_top_logprobs", type=int, default=5, metavar="N",
                  help="the most alternatives (logprobs / top_logprobs) a request may ask for "
                  "at each token; 0: none (the step skips the top-N)")
  ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                  help="compile every step shape before listening")
  ap.add_argument("--log_level", default="info")
  args = ap.parse_args(argv)
  if args.prompt_lookup < 0:
    ap.error(f"--prompt_lookup must be >= 0 (0: off), got {args.prompt_lookup}")
  if args.num_draft < 1:
    ap.error(f"--num_draft must be >= 1, got {args.num_draft}")
  if args.max_top_logprobs < 0:
    ap.error(f"--max_top_logprobs must be >= 0, got {args.max_top_logprobs}")
  return args


def create_app(model, engine_loop: EngineLoop, name: str) -> fastapi.FastAPI:
  """The routes over a started-on-startup EngineLoop. `model`: a loaders.LoadedModel."""
  engine = engine_loop.engine
  grammars = None  # built on the first response_format (llguidance reads the whole vocabulary)
  # The most tokens one request can hold: its context, and its pages must fit in the pool.
  room = min(engine.max_seq_len, engine.allocator.capacity * engine.config.page_size)

  beams = _Beams(model, engine, room, engine_loop.max_queue)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    engine_loop.start()
    yield
    engine_loop.stop()  # uvicorn has finished every request by now
    beams.executor.shutdown(cancel_futures=True)

  app = fastapi.FastAPI(lifespan=lifespan)

  @app.exception_handler(APIError)
  async def api_error(request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(Exception)
  async def internal_error(request, e: Exception):
    return JSONResponse(APIError(500, f"internal error: {e!r}", kind="server_error").body(),
                        status_code=500)

  @app.get("/health")
  async def health():
    if not engine_loop.alive():
      return JSONResponse({"status": "engine stopped"}, status_code=503)
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                        "owned_by": "jaxllm", "max_model_len": room}]}

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(engine_loop.render_metrics(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    req = _request(CompletionRequest, await request.body(), name)
    prompts = [model.encode(p) if isinstance(p, str) else p for p in req.prompts()]
    fmt = Format("text_completion", name, model.tokenizer, req.logprobs is not None)
    return await answer(request, req, prompts, req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS,
                        fmt, "prompt")

  @app.post("/v1/chat/completions")
  async def chat(request: fastapi.Request):
    req = _request(ChatRequest, await request.body(), name)
    if not model.chat_template:
      raise APIError(400, f"messages: {name} has no chat template; use /v1/completions",
                     "messages")
    try:
      ids = model.encode_messages([m.as_template_input() for m in req.messages])
    except Exception as e:  # noqa: BLE001  the template refused these messages
      raise APIError(400, f"messages: the chat template failed: {e}", "messages") from None
    fmt = Format("chat.completion", name, model.tokenizer, req.logprobs)
    return await answer(request, req, [ids], req.budget(), fmt, "messages")

  def compile_format(response_format: dict):
    nonlocal grammars
    try:
      if grammars is None:
        grammars = structured.GrammarCompiler(model.tokenizer, model.cfg.vocab_size,
                                              model.eos_ids)
      return grammars.response_format(response_format)
    except Exception as e:  # noqa: BLE001  a bad format, or a tokenizer llguidance cannot read
      # infer/structured.py's messages begin with the field ("response_format.type must ...").
      param, _, rest = str(e).partition(" ")
      if not param.startswith("response_format"):
        param, rest = "response_format", str(e)
      param = param.rstrip(":")
      raise APIError(400, f"{param}: {rest}", param) from None

  async def answer(request, req, prompts: list[list[int]], budget: int | None, fmt: Format,
                   field: str):
    eos_ids = () if req.ignore_eos else tuple(model.eos_ids)
    req.check_beams()
    if req.num_beams > 1:
      return await beams.answer(request, req, prompts, budget, fmt, field, eos_ids)
    top = req.top_logprobs_wanted()
    if top > engine.config.top_logprobs:
      param = "logprobs" if fmt.kind == "text_completion" else "top_logprobs"
      raise APIError(400, f"{param}: {top} alternatives asked for; this server keeps at most "
                     f"{engine.config.top_logprobs} (--max_top_logprobs)", param)
    jobs = _jobs(req, prompts, budget, eos_ids, field, model.cfg.vocab_size, room)
    for job in jobs:
      job.top_logprobs = top
    if req.response_format is not None:
      constraint = compile_format(req.response_format)
      for job in jobs:
        job.constraint = constraint
    texts = [StreamText(model.tokenizer, stop=req.stops(), eos_ids=eos_ids) for _ in jobs]
    try:
      engine_loop.submit(jobs)
    except QueueFull as e:
      raise APIError(429, f"server busy: {e}; retry later", kind="rate_limit_error") from None
    deltas = _deltas(engine_loop, jobs, texts)
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
      return StreamingResponse(_sse(fmt, deltas, texts, prompt_tokens, req.include_usage()),
                               media_type="text/event-stream")

    async def collect():
      async for _ in deltas:
        pass
      return fmt.response(texts, usage(prompt_tokens, sum(len(t.ids) for t in texts)))
    return await _unless_disconnected(request, collect())

  return app


class _Beams:
  """Beam-search requests: infer/beam.py's jitted loop over a contiguous cache of its own (not
  the engine's pages), one request at a time on a thread of its own, beside the engine's
  steps rather than in them, on the engine's weights. A request waits for the whole search
  and gets the n best beams; its text is cut at a stop string afterwards. A client that
  leaves gets nothing more: its search is dropped if it has not started, and otherwise runs
  to its end (still counted against max_queue)."""

  def __init__(self, model, engine, room: int, max_queue: int):
    self.model, self.engine, self.room, self.max_queue = model, engine, room, max_queue
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="beams")
    self.pending = 0  # requests queued or searching (event loop only)

  async def answer(self, request, req, prompts, budget, fmt: Format, field: str, eos_ids):
    vocab = self.model.cfg.vocab_size
    limits = [_limit(req, p, budget, field, vocab, self.room) for p in prompts]
    if self.pending >= self.max_queue:
      raise APIError(429, f"server busy: {self.pending} beam-search requests are queued "
                     f"(--max_queue={self.max_queue}); retry later", kind="rate_limit_error")
    loop = asyncio.get_running_loop()
    self.pending += 1
    search = self.executor.submit(self._search, req, prompts, limits, eos_ids)
    # Counted down when the search ends (or is dropped unstarted), not when its client leaves.
    search.add_done_callback(lambda _: loop.call_soon_threadsafe(self._done))

    async def collect():
      try:
        found = await asyncio.wrap_future(search)
      except ValueError as e:  # beam_search's own checks (the candidates a vocabulary holds)
        raise APIError(400, f"num_beams: {e}", "num_beams") from None
      texts = []
      for hypotheses in found:
        for ids in hypotheses:
          text = StreamText(self.model.tokenizer, stop=req.stops(), eos_ids=eos_ids)
          text.add(ids, [0.0] * len(ids), True)
          texts.append(text)
      return fmt.response(texts, usage(sum(len(p) for p in prompts),
                                       sum(len(t.ids) for t in texts)))
    return await _unless_disconnected(request, collect())

  def _done(self):
    self.pending -= 1

  def _search(self, req, prompts, limits, eos_ids) -> list[list[list[int]]]:
    """Each prompt's n best hypotheses (token ids, best first); on the beam thread."""
    return [beam.beam_search(
        self.model.cfg, self.engine.params, [p], num_beams=req.num_beams, max_new_tokens=n,
        length_penalty=req.length_penalty, early_stopping=req.early_stopping,
        num_return_sequences=req.n, eos_ids=eos_ids,
        cache_dtype=self.engine.config.cache_dtype).tokens[0]
        for p, n in zip(prompts, limits)]


def _request(cls, body: bytes, name: str):
  try:
    decoded = json.loads(body)
  except ValueError as e:
    raise APIError(400, f"the body is not valid JSON: {e}") from None
  req = parse(cls, decoded)
  if req.model != name:
    raise APIError(400, f"model: unknown model {req.model!r}; this server serves {name!r}",
                   "model")
  return req


def _limit(req, p: list[int], budget, field, vocab_size, room) -> int:
  """The new-token budget of prompt `p`, checked against the vocabulary and the context."""
  if not p:
    raise APIError(400, f"{field}: the prompt is empty", field)
  if not all(0 <= t < vocab_size for t in p):
    raise APIError(400, f"{field}: token ids must be in [0, {vocab_size})", field)
  if len(p) >= room:
    raise APIError(400, f"{field}: {len(p)} prompt tokens leave no room for a new one in "
                   f"the context of {room} tokens", field)
  limit = budget if budget is not None else room - len(p)
  if len(p) + limit > room:
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else \
        "max_tokens"
    raise APIError(400, f"{param}: {limit} new tokens after {len(p)} prompt tokens exceed "
                   f"the context of {room} tokens", param)
  return limit


def _jobs(req, prompts, budget, eos_ids, field, vocab_size, room) -> list[Job]:
  """req.n jobs per prompt."""
  loop, queue = asyncio.get_running_loop(), asyncio.Queue()
  base = req.seed if req.seed is not None else secrets.randbits(32)
  jobs = []
  for p in prompts:
    limit = _limit(req, p, budget, field, vocab_size, room)
    for _ in range(req.n):
      # n > 1: each choice its own seed, or they would all be the same sample.
      jobs.append(Job(prompt=list(p), max_new_tokens=limit, sampling=req.sampling(),
                      seed=(base + len(jobs)) % 2**32, index=len(jobs), eos_ids=eos_ids,
                      queue=queue, loop=loop))
  return jobs


async def _deltas(engine_loop: EngineLoop, jobs: list[Job], texts: list[StreamText]):
  """(choice index, Delta, finish reason or None) as tokens arrive. Closed early (the client
  left, an error), it cancels every choice still generating."""
  queue, remaining = jobs[0].queue, len(jobs)
  try:
    while remaining:
      event = await queue.get()
      if event.error is not None:
        raise APIError(event.status, event.error,
                       kind="invalid_request_error" if event.status == 400 else "server_error")
      text = texts[event.index]
      if text.finish_reason is not None:
        continue  # a stop string ended it: tokens already under way are dropped
      delta = text.add(event.tokens, event.logprobs, event.finished, event.top_logprobs)
      if text.finish_reason is not None:
        remaining -= 1
        if not event.finished:
          engine_loop.cancel(jobs[event.index])
      yield event.index, delta, text.finish_reason
  finally:
    for job, text in zip(jobs, texts):
      if text.finish_reason is None:
        engine_loop.cancel(job)


def _event(obj) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(fmt: Format, deltas, texts: list[StreamText], prompt_tokens: int,
               include_usage: bool):
  started, offsets = set(), [0] * len(texts)
  try:
    async for index, delta, finish in deltas:
      first = index not in started
      if first or delta.text or finish or (fmt.want_logprobs and delta.tokens):
        yield _event(fmt.chunk(index, delta, finish, first, offsets[index]))
        started.add(index)
        offsets[index] += len(delta.text)
    if include_usage:
      yield _event(fmt.usage_chunk(usage(prompt_tokens, sum(len(t.ids) for t in texts))))
    yield "data: [DONE]\n\n"
  except APIError as e:  # the status line has gone: the error travels as an event
    yield _event(e.body())


async def _unless_disconnected(request: fastapi.Request, work):
  """Awaits `work`, cancelling it (and so its engine requests) if the client goes away."""
  async def gone():
    while (await request.receive())["type"] != "http.disconnect":
      pass
  task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
  try:
    await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
  finally:
    watch.cancel()
  if not task.done():
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
      await task
    return fastapi.Response(status_code=499)  # nobody reads it
  return task.result()


def main(argv=None) -> int:
  args = parse_args(argv)
  import uvicorn

  from infer.engine import Engine, EngineConfig
  from infer.generate import load

  try:
    model = load(args)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  engine = Engine(model.cfg, model.params, EngineConfig(
      num_pages=args.num_pages, page_size=args.page_size, max_batch=args.max_batch,
      prefill_chunk=args.prefill_chunk, max_seq_len=args.max_seq_len,
      cache_dtype=args.kv_cache_dtype, prompt_lookup=args.prompt_lookup,
      num_draft=args.num_draft, top_logprobs=args.max_top_logprobs), eos_ids=model.eos_ids)
  if args.warmup:
    print(f"compiled the engine's steps in {engine.warmup():.1f}s", file=sys.stderr,
          flush=True)
  name = args.model_name or os.path.basename(os.path.normpath(
      args.checkpoint or args.hf or args.gguf))
  app = create_app(model, EngineLoop(engine, max_queue=args.max_queue), name)
  # On SIGTERM uvicorn stops listening, waits for every open request to finish, then raises
  # the signal again under the handler it found at start: this no-op, so a drained server
  # returns from run() and exits 0.
  signal.signal(signal.SIGTERM, lambda *_: None)
  uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
  return 0


if __name__ == "__main__":
  sys.exit(main())
