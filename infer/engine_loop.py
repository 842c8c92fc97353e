"""The engine on its own thread, fed from an asyncio server.

One loop: take new requests and cancellations from a thread-safe inbox, run `engine.step()`,
and hand each request's new tokens to its asyncio queue with `loop.call_soon_threadsafe`. The
engine is touched by this thread only; the event loop never waits for a step.

    loop = EngineLoop(engine, max_queue=64)
    loop.start()
    loop.submit([Job(prompt=ids, max_new_tokens=16, sampling=..., seed=0, index=0,
                     eos_ids=model.eos_ids, queue=asyncio.Queue(),
                     loop=asyncio.get_running_loop())])
    event = await job.queue.get()  # Event(index, tokens, logprobs, finished, error)
"""

import asyncio
import dataclasses
import logging
import queue
import threading
import time

from infer import metrics
from infer.engine import Engine
from infer.sampling import SamplingParams
from infer.structured import Constraint

log = logging.getLogger(__name__)


class QueueFull(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class Event:
  """New tokens of choice `index`; `finished`: the engine stopped it (EOS or its budget);
  `error`: it failed (and nothing more will come), with the HTTP status that fits."""
  index: int
  tokens: tuple[int, ...] = ()
  logprobs: tuple[float, ...] = ()
  # Per token, its request's top (token, log-probability) pairs (empty tuples if none asked).
  top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
  finished: bool = False
  error: str | None = None
  status: int = 500


@dataclasses.dataclass(eq=False)
class Job:
  """One completion to generate and where its events go."""
  prompt: list[int]
  max_new_tokens: int
  sampling: SamplingParams
  seed: int
  index: int  # the choice it answers
  eos_ids: tuple[int, ...]
  queue: asyncio.Queue
  loop: asyncio.AbstractEventLoop
  constraint: Constraint | None = None  # structured output (infer/structured.py)
  top_logprobs: int = 0  # alternatives per output token (the engine's top_logprobs at most)
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  # Engine thread only from here.
  rid: int | None = None
  admitted: bool = False  # left the waiting queue (running, finished, failed or cancelled)
  last_token: float | None = None


class EngineLoop:
  def __init__(self, engine: Engine, *, max_queue: int):
    self.engine, self.max_queue = engine, max_queue
    self.inbox: queue.Queue = queue.Queue()
    self.jobs: dict[int, Job] = {}  # engine request id -> job, while the engine holds it
    self.lock = threading.Lock()
    self.waiting = 0  # submitted jobs not yet admitted (under lock)
    self.stopping = threading.Event()
    self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
    self.ttft = metrics.Histogram("jaxllm_time_to_first_token_seconds",
                                  "From arrival to the first generated token.",
                                  metrics.TTFT_BUCKETS)
    self.itl = metrics.Histogram("jaxllm_inter_token_latency_seconds",
                                 "Between consecutive tokens of one request.",
                                 metrics.ITL_BUCKETS)
    self.tokens = metrics.TokenRate()
    self.cancelled = 0  # requests stopped before the engine finished them
    self.failed = 0
    self.snapshot = self._snapshot()  # replaced whole by the engine thread: reads are safe

  # ------------------------------------------------------------------------ any thread

  def start(self):
    self.thread.start()

  def stop(self):
    """Stops after the current step; what is still queued or running is abandoned."""
    self.stopping.set()
    self.thread.join()

  def alive(self) -> bool:
    return self.thread.is_alive()

  def submit(self, jobs: list[Job]):
    """Queues all of `jobs` or, when that would leave more than max_queue waiting, none
    (QueueFull)."""
    with self.lock:
      if self.waiting + len(jobs) > self.max_queue:
        raise QueueFull(f"{self.waiting} requests are waiting (--max_queue={self.max_queue})")
      self.waiting += len(jobs)
    for job in jobs:
      self.inbox.put(("add", job))

  def cancel(self, job: Job):
    """Stops `job` and frees its pages; harmless once it has finished."""
    self.inbox.put(("cancel", job))

  def render_metrics(self) -> str:
    s = self.snapshot
    lines = (
        metrics.scalar("jaxllm_requests_running", "Requests in the running batch.", s["running"])
        + metrics.scalar("jaxllm_requests_waiting", "Requests not yet admitted to the running "
                        "batch.", s["waiting"])
        + metrics.scalar("jaxllm_pages_in_use", "KV-cache pages held by requests.", s["used"])
        + metrics.scalar("jaxllm_pages_free", "KV-cache pages free.", s["free"])
        + metrics.scalar("jaxllm_generated_tokens_total", "Tokens generated.",
                        self.tokens.total, "counter")
        + metrics.scalar("jaxllm_generated_tokens_per_second", "Over the last "
                        f"{self.tokens.window:g} s.", self.tokens.per_second())
        + metrics.scalar("jaxllm_requests_cancelled_total", "Stopped early: client gone, stop "
                        "string.", self.cancelled, "counter")
        + metrics.scalar("jaxllm_requests_failed_total", "Failed in the engine.", self.failed,
                        "counter")
        + metrics.scalar("jaxllm_preemptions_total", "Requests preempted for pages.",
                        s["preemptions"], "counter")
        + self.ttft.render() + self.itl.render())
    return "\n".join(lines) + "\n"

  # ------------------------------------------------------------------------ engine thread

  def _snapshot(self) -> dict:
    e = self.engine
    return {"running": len(e.running), "waiting": self.waiting, "used": e.allocator.num_used,
            "free": e.allocator.num_free, "preemptions": e.num_preemptions}

  def _run(self):
    while not self.stopping.is_set():
      self._take_commands(block=not self.engine.has_work())
      if self.engine.has_work():
        self._step()
      self.snapshot = self._snapshot()

  def _take_commands(self, block: bool):
    try:
      command = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
    except queue.Empty:
      return
    while True:
      what, job = command
      if what == "add":
        self._add(job)
      elif job.rid in self.jobs:  # not yet finished
        self._drop(job)
        self.cancelled += 1
      try:
        command = self.inbox.get_nowait()
      except queue.Empty:
        return

  def _add(self, job: Job):
    try:
      job.rid = self.engine.add_request(job.prompt, max_new_tokens=job.max_new_tokens,
                                        sampling=job.sampling, seed=job.seed,
                                        eos_ids=job.eos_ids, constraint=job.constraint,
                                        top_logprobs=job.top_logprobs)
    except Exception as e:  # noqa: BLE001  this request alone fails (ValueError: its fault)
      self._admitted(job)
      self.failed += 1
      self._post(job, Event(job.index, error=str(e),
                            status=400 if isinstance(e, ValueError) else 500))
      return
    self.jobs[job.rid] = job

  def _drop(self, job: Job):
    del self.jobs[job.rid]
    self.engine.cancel(job.rid)
    self._admitted(job)

  def _admitted(self, job: Job):
    if not job.admitted:
      job.admitted = True
      with self.lock:
        self.waiting -= 1

  def _step(self):
    try:
      events = self.engine.step()
    except Exception as e:  # noqa: BLE001  the batch of this step fails, the server lives
      log.exception("engine step failed; failing the requests it was running")
      for r in list(self.engine.running):
        job = self.jobs[r.id]
        self._drop(job)
        self.failed += 1
        self._post(job, Event(job.index, error=f"engine step failed: {e}"))
      return
    now = time.perf_counter()
    for r in self.engine.running:
      self._admitted(self.jobs[r.id])
    for rid, toks in events:
      job, r = self.jobs[rid], self.engine.requests[rid]
      if job.last_token is None:
        self.ttft.observe(now - job.submitted)
      else:
        self.itl.observe(now - job.last_token)
      job.last_token = now
      tops = tuple(tuple(t) for t in r.top[-len(toks):]) if r.top_logprobs else ()
      event = Event(job.index, tuple(toks), tuple(r.logprobs[-len(toks):]), tops, r.finished)
      if r.finished:
        self._drop(job)
      self._post(job, event)
    self.tokens.add(sum(len(toks) for _, toks in events), now)

  @staticmethod
  def _post(job: Job, event: Event):
    try:
      job.loop.call_soon_threadsafe(job.queue.put_nowait, event)
    except RuntimeError:  # its event loop has closed: nobody is listening
      pass
