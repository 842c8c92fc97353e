"""A continuous-batching engine over the paged KV cache (Kwon et al. 2023; Orca, Yu et al. 2022).

Each `step()`:
  1. admits waiting requests (oldest first) while a slot and the pages for their prompt are
     free, reusing cached full pages of a shared prefix (infer/pages.py);
  2. gives every running request the pages its next tokens need, copying a shared page before
     the first write into it (copy-on-write); when the pool runs out, the newest running
     request is preempted: its pages are freed and it waits to be recomputed (prompt plus what
     it already generated), never dropped;
  3. runs one jitted device step: pending copies, then one forward over a chunk of each
     prefilling prompt (long prompts are split into chunks, interleaved with decoding) and
     the next token of every decoding request, so the step reads the weights once
     (kv_cache.PackedTables), and sampling with each request's own settings and seed;
  4. appends the sampled tokens (and their log-probabilities); finished requests free their
     pages at once, so waiting requests take their slots on the next step.

Speculation by prompt lookup (`EngineConfig.prompt_lookup`, Saxena 2023): a decoding request
also feeds up to `num_draft` tokens copied from its own context after the latest earlier
match of its last n-gram (infer/speculative.lookup_drafts). Every fed position is sampled
with the key plain decoding would use there (the row's seed and its output length so far + i),
and draft i is accepted while the token sampled before it equals it; the accepted drafts and
the first sampled token that differs (or the one after the last draft) are emitted. For a
one-hot draft "sample from p, accept if equal" is Leviathan et al.'s rule (accept x with
probability p(x), else sample from p without x), and because each position draws with the
same key as plain decoding, the output is token for token what the engine gives without
speculation, greedy or sampled. Rows with a repetition penalty or a structured constraint
do not speculate. When every row of a step is greedy the step draws no random numbers
(Features.greedy_only).

`cancel(rid)` stops a request wherever it is and frees its pages; it also forgets finished
requests, which a long-running server must do (the engine keeps each one until then).

A request may carry a `structured.Constraint` (a JSON schema or regex): its matcher's token
bitmask enters the step's sampling (rows without one get all ones) and consumes each token the
request receives, so the output stays in the grammar's language (infer/structured.py).

The device sees plain arrays: the page pool (donated, updated in place), page tables, lengths.
A request only ever reads pages in its own table (its own or shared copies of the same prefix)
and the null page, so it can never read another request's tokens.
"""

import bisect
import collections
import dataclasses
import functools
import time
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from infer import sampling as sampling_lib
from infer import step, structured
from infer.pages import NULL_PAGE, OutOfPages, PageAllocator, chain_hash
from infer.sampling import Features, SamplingBatch, SamplingParams
from infer.speculative import lookup_drafts
from model import ModelConfig, fused, kv_cache
from model.kv_cache import PackedPagedKVCache, PackedTables, PagedKVCache, PageTable


MIN_TABLE_WIDTH = 4  # pages


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  num_pages: int = 512  # including the null page
  page_size: int = 16
  max_batch: int = 16  # requests running at once (rows of the decode forward)
  prefill_chunk: int = 128  # prompt tokens per prefilling request per step
  prefill_rows: int = 1  # prefilling requests advanced per step
  max_seq_len: int = 0  # 0: the model's max_seq_len
  prefix_caching: bool = True
  cache_dtype: str | None = None  # "bfloat16", "float32", "int8"; None: the compute dtype
  prompt_lookup: int = 0  # speculation: the longest n-gram looked up in a request's context; 0 off
  num_draft: int = 4  # speculation: draft tokens per decoding request and step
  # The most alternatives (the top-N log-probabilities at each emitted token) a request may
  # ask for; 0: the step computes none.
  top_logprobs: int = 0


@dataclasses.dataclass
class Request:
  id: int
  prompt: list[int]
  max_new_tokens: int
  sampling: SamplingParams
  seed: int
  eos_ids: frozenset
  arrival: float
  output: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)  # one per output token
  top_logprobs: int = 0  # alternatives asked for per output token
  # Per output token: the top_logprobs most likely (token, log-probability) pairs, most likely
  # first, under the same law as `logprobs` (empty when none were asked for).
  top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)  # logical -> physical page
  keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix keys of its full pages
  computed: int = 0  # tokens whose K/V are in its pages
  slot: int | None = None
  copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst) pending
  drafts: list[int] = dataclasses.field(default_factory=list)  # fed after the last token (step)
  finished: bool = False
  preemptions: int = 0
  cached_tokens: int = 0  # prompt tokens served from the prefix cache (last admission)
  first_token_time: float | None = None
  finish_time: float | None = None
  seen: np.ndarray | None = None  # bool[V], for the repetition penalty
  matcher: structured.Matcher | None = None  # structured output: the grammar's parse so far

  @property
  def tokens(self) -> list[int]:
    return self.prompt + self.output

  @property
  def to_feed(self) -> int:
    return len(self.prompt) + len(self.output) - self.computed


@flax.struct.dataclass
class _Group:
  """Rows of one length in the step's forward: `n_real` tokens of each row from position
  `start` (0: inactive). Each row samples at its last real token, or (sample_all) at every
  position t, with the key counter counter + t (speculation: the row's drafts follow its last
  token)."""
  tokens: jax.Array  # int32[R, T]
  n_real: jax.Array  # int32[R]
  start: jax.Array  # int32[R]
  table: jax.Array  # int32[R, pages_per_seq]
  seeds: jax.Array  # uint32[R]
  counter: jax.Array  # int32[R]: tokens generated so far (the sampling key's counter)
  sampling: SamplingBatch
  seen: jax.Array  # bool[R, V] or bool[R, 1]
  allowed: jax.Array | None = None  # int32[R, ceil(V/32)] token bitmask; None: no constraints
  sample_all: bool = flax.struct.field(pytree_node=False, default=False)

  def sampled(self, offset: int):
    """The step's sampled tokens from this group (its tokens at `offset` among the packed
    ones): (packed index int32[M], key counter int32[M], and per sampled row its seed,
    settings, seen mask and bitmask)."""
    r, t = self.tokens.shape
    per_row = (self.seeds, self.sampling, self.seen, self.allowed)
    if not self.sample_all:
      return (offset + jnp.arange(r) * t + jnp.maximum(self.n_real - 1, 0), self.counter,
              *per_row)
    each = lambda x: jnp.repeat(x, t, axis=0)  # row b's settings for each of its t positions
    counter = self.counter[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return (offset + jnp.arange(r * t), counter.reshape(-1), *jax.tree.map(each, per_row))


@functools.partial(jax.jit, static_argnames=("cfg", "features", "top_n"),
                   donate_argnames=("pools",))
def _device_step(params, pools, copy_src, copy_dst, groups: tuple[_Group, ...], *,
                 cfg: ModelConfig, features: Features, top_n: int = 0):
  """pools: (k_pages, v_pages, k_scale, v_scale), each a tuple of one array per layer (the
  scales None unless the cache is int8: model/kv_cache.PagedKVCache). Returns the pools and,
  per group, its sampled tokens and their log-probabilities ([R], or [R, T] if sample_all),
  and the top_n most likely tokens and their log-probabilities ([R, top_n] or
  [R, T, top_n])."""
  # Copy-on-write first: no row writes a shared page, so sources are still intact.
  pools = jax.tree.map(lambda pool: pool.at[:, copy_dst].set(pool[:, copy_src]), pools)
  k_pages, v_pages, k_scale, v_scale = pools
  tables = PackedTables(tuple(PageTable(lengths=g.start, page_indices=g.table) for g in groups),
                        tuple(g.tokens.shape[1] for g in groups))
  cache = PackedPagedKVCache(k_pages=k_pages, v_pages=v_pages, tables=tables,
                             k_scale=k_scale, v_scale=v_scale)
  offsets = np.cumsum([0] + [g.tokens.size for g in groups[:-1]]).tolist()
  at, counter, seeds, sampling, seen, allowed = jax.tree.map(
      lambda *x: jnp.concatenate(x), *(g.sampled(o) for g, o in zip(groups, offsets)))
  # One forward for every group; the head runs at the sampled tokens alone ([M, V]).
  logits, cache = step.forward_packed(cfg, params, tuple(g.tokens for g in groups),
                                      tuple(g.n_real for g in groups), cache, at)
  pools = (cache.k_pages, cache.v_pages, cache.k_scale, cache.v_scale)
  keys = (None if features.greedy_only  # argmax only: no key is made, no noise drawn
          else sampling_lib.token_keys(sampling_lib.row_keys(seeds), counter))
  tok = sampling_lib.sample_rows(keys, logits, sampling, features, seen, allowed)
  logp = step.logprobs_at_temperature(logits, sampling.temperature)  # [M, V], once
  lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
  top_lp, top_id = jax.lax.top_k(logp, top_n)  # [M, top_n], most likely first
  out, m = [], 0
  for g in groups:
    r, t = g.tokens.shape
    n = r * t if g.sample_all else r
    shape = (r, t) if g.sample_all else (r,)
    out.append((tok[m:m + n].reshape(shape), lp[m:m + n].reshape(shape),
                top_id[m:m + n].reshape(*shape, top_n), top_lp[m:m + n].reshape(*shape, top_n)))
    m += n
  return pools, tuple(out)


@dataclasses.dataclass
class Completion:
  tokens: list[int]  # generated ids (prompt excluded), cut after the first EOS
  # log_softmax(logits / T)[token] per token (T = 1 when greedy), before any filter, as
  # infer/decode.py's return_logprobs
  logprobs: list[float]
  # Per token, the request's top_logprobs most likely (token, log-probability) pairs under
  # the same law, most likely first ([] when none were asked for).
  top_logprobs: list[list[tuple[int, float]]]
  arrival: float
  first_token_time: float
  finish_time: float
  preemptions: int
  cached_tokens: int

  @property
  def latency(self) -> float:
    return self.finish_time - self.arrival


class Engine:
  """Continuous batching over a paged KV cache. Host-side scheduling, device-side arrays."""

  def __init__(self, cfg: ModelConfig, params, config: EngineConfig = EngineConfig(), *,
               eos_ids: Sequence[int] = ()):
    dtype = kv_cache.storage_dtype(cfg, config.cache_dtype, "EngineConfig.cache_dtype")
    if config.prompt_lookup < 0:
      raise ValueError(f"EngineConfig.prompt_lookup must be >= 0 (0: no speculation), got "
                       f"{config.prompt_lookup}")
    if config.prompt_lookup and config.num_draft < 1:
      raise ValueError(f"EngineConfig.num_draft must be >= 1 with prompt_lookup, got "
                       f"{config.num_draft}")
    # The inference layout (model/fused.py), its layers one by one with one page pool per
    # layer: each step updates the pools in place. [in, out] matrices: a step carries many rows.
    self.cfg = dataclasses.replace(cfg, scan_layers=False, remat="none")
    self.params = fused.prepare(cfg, params, layout="in_out")
    self.config = config
    self.eos_ids = frozenset(int(e) for e in eos_ids)
    self.max_seq_len = config.max_seq_len or cfg.max_seq_len
    p = config.page_size
    self.pages_per_seq = -(-self.max_seq_len // p)
    self.allocator = PageAllocator(config.num_pages, p)
    # (k_pages, v_pages, k_scale, v_scale): [K, num_pages, P, H] per layer, and for an int8
    # cache f32 [K, num_pages, P] scales (else None). Tables and lengths are each step's own.
    empty = PagedKVCache.init(cfg, 1, config.num_pages, p, 1, dtype, per_layer=True)
    self.pools = (empty.k_pages, empty.v_pages, empty.k_scale, empty.v_scale)
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: list[Request] = []
    self.requests: dict[int, Request] = {}
    self.free_slots = list(range(config.max_batch))
    self.features = Features()  # the filters any request so far uses (greedy_only: per step)
    self.constrained = False  # once a request has a constraint, every step takes a bitmask
    self.num_steps = 0
    self.num_preemptions = 0
    self.num_drafted = 0  # prompt-lookup draft tokens fed
    self.num_accepted = 0  # ... and accepted
    self.page_slots_used = 0  # sum over steps of (pages in use) x page_size
    self.page_slots_filled = 0  # sum over steps of the tokens those pages hold
    self._next_id = 0

  # ------------------------------------------------------------------------------ requests

  def add_request(self, prompt: Sequence[int], *, max_new_tokens: int,
                  sampling: SamplingParams = SamplingParams(), seed: int = 0,
                  eos_ids: Sequence[int] | None = None, arrival: float | None = None,
                  constraint: structured.Constraint | None = None,
                  top_logprobs: int = 0) -> int:
    """`constraint`: structured output (infer/structured.py), e.g. from
    `GrammarCompiler.response_format`; None: free. `top_logprobs`: the most likely tokens
    and their log-probabilities to keep at each output token (at most the engine's
    EngineConfig.top_logprobs)."""
    prompt = [int(t) for t in prompt]
    if not prompt:
      raise ValueError("a request needs at least one prompt token")
    if not 0 <= top_logprobs <= self.config.top_logprobs:
      raise ValueError(f"top_logprobs={top_logprobs}: this engine keeps at most "
                       f"{self.config.top_logprobs} (EngineConfig.top_logprobs)")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = len(prompt) + max_new_tokens
    if total > self.max_seq_len:
      raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} "
                       f"exceeds the engine's max_seq_len={self.max_seq_len}")
    if -(-total // self.config.page_size) > self.allocator.capacity:
      raise ValueError(f"a request of {total} tokens needs more pages than the pool has "
                       f"({self.allocator.capacity} of {self.config.page_size} tokens); raise "
                       "num_pages")
    eos_ids = self.eos_ids if eos_ids is None else frozenset(int(e) for e in eos_ids)
    if constraint is not None and not set(constraint.eos_ids) <= eos_ids:
      raise ValueError(f"{constraint.source}: its grammar ends with EOS "
                       f"{list(constraint.eos_ids)}, which must be among the request's eos_ids "
                       f"{sorted(eos_ids)}")
    rid = self._next_id
    self._next_id += 1
    r = Request(id=rid, prompt=prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                seed=seed, eos_ids=eos_ids,
                arrival=time.perf_counter() if arrival is None else arrival,
                matcher=None if constraint is None else constraint.matcher(),
                top_logprobs=top_logprobs)
    self.constrained = self.constrained or constraint is not None
    self.features = self.features | Features.of([sampling])
    self.requests[rid] = r
    self._enqueue(r)
    return rid

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def completion(self, rid: int) -> Completion:
    r = self.requests[rid]
    return Completion(tokens=list(r.output), logprobs=list(r.logprobs),
                      top_logprobs=[list(t) for t in r.top], arrival=r.arrival,
                      first_token_time=r.first_token_time, finish_time=r.finish_time,
                      preemptions=r.preemptions, cached_tokens=r.cached_tokens)

  def cancel(self, rid: int):
    """Stops request `rid` if it is waiting or running, freeing its pages, and forgets it
    (finished or not): its id is unknown from then on."""
    r = self.requests.pop(rid)
    if r in self.waiting:
      self.waiting.remove(r)
    elif r in self.running:
      self._finish(r, time.perf_counter())

  def run(self, on_tokens: Callable[[int, list[int]], None] | None = None
          ) -> dict[int, Completion]:
    """Steps until every request has finished; returns their completions by id."""
    while self.has_work():
      for rid, toks in self.step():
        if on_tokens is not None:
          on_tokens(rid, toks)
    return {rid: self.completion(rid) for rid, r in self.requests.items() if r.finished}

  # ------------------------------------------------------------------------------ scheduling

  def _enqueue(self, r: Request):
    """Waiting requests stay in arrival order, so a preempted one goes back near the front."""
    keys = [(w.arrival, w.id) for w in self.waiting]
    self.waiting.insert(bisect.bisect(keys, (r.arrival, r.id)), r)

  def _match_prefix(self, tokens: list[int]) -> list[tuple[int, bytes]]:
    if not self.config.prefix_caching:
      return []
    p, parent, matched = self.config.page_size, b"", []
    for i in range(len(tokens) // p):
      key = chain_hash(parent, tokens[i * p:(i + 1) * p])
      page = self.allocator.lookup(key)
      if page is None:
        break
      matched.append((page, key))
      parent = key
    return matched

  def _admit(self):
    p = self.config.page_size
    while self.waiting and self.free_slots:
      r = self.waiting[0]
      tokens = r.tokens
      matched = self._match_prefix(tokens)
      # At least the last token is computed again: its logits give the next token.
      computed = min(len(matched) * p, len(tokens) - 1)
      # Pages for the whole prompt, plus one to copy if the last token's page is shared.
      need = -(-len(tokens) // p) - len(matched) + (computed < len(matched) * p)
      revived = sum(self.allocator.refcount[page] == 0 for page, _ in matched)
      if self.allocator.num_free - revived < need:
        return  # wait until finished requests free pages (keeps arrival order)
      for page, _ in matched:
        self.allocator.retain(page)
      self.waiting.popleft()
      r.pages = [page for page, _ in matched]
      r.keys = [key for _, key in matched]
      r.computed = r.cached_tokens = computed
      r.slot = self.free_slots.pop()
      r.seen = None  # built when a step first needs it
      self.running.append(r)

  def _preempt(self, r: Request):
    """Frees all of r's pages and puts it back in the queue; it recomputes later."""
    for page in r.pages:
      self.allocator.release(page)
    r.pages, r.keys, r.copies, r.computed = [], [], [], 0
    self.free_slots.append(r.slot)
    r.slot = None
    r.preemptions += 1
    self.num_preemptions += 1
    self.running.remove(r)
    self._enqueue(r)

  def _reserve(self, r: Request, n: int):
    """Pages for r's positions [computed, computed + n), copying a shared one first."""
    p = self.config.page_size
    first = r.computed // p
    if first < len(r.pages):
      page, src = self.allocator.copy_on_write(r.pages[first])
      if page != src:
        r.pages[first] = page
        r.copies.append((src, page))
        del r.keys[first:]  # the private copy is no longer the cached page
    while len(r.pages) < -(-(r.computed + n) // p):
      r.pages.append(self.allocator.allocate())

  def _propose(self, decode: list[Request]):
    """Sets each decoding request's prompt-lookup drafts (none without speculation, with a
    repetition penalty or a constraint, or when one more token ends the request)."""
    for r in self.running:
      r.drafts = []
    cfg = self.config
    rows = [r for r in decode if r.sampling.repetition_penalty == 1 and r.matcher is None
            and r.max_new_tokens - len(r.output) > 1] if cfg.prompt_lookup else []
    if not rows:
      return
    contexts = [r.tokens for r in rows]
    lens = np.array([len(c) for c in contexts], np.int32)
    tokens = np.zeros((len(rows), max(lens.max(), cfg.prompt_lookup + 1)), np.int32)
    for i, c in enumerate(contexts):
      tokens[i, :len(c)] = c
    drafts, count = lookup_drafts(tokens, lens, cfg.prompt_lookup, cfg.num_draft, xp=np)
    for r, d, n in zip(rows, drafts.tolist(), count.tolist()):
      # Draft i is worth feeding only if the request may still emit it and one more token.
      r.drafts = d[:min(n, r.max_new_tokens - len(r.output) - 1)]

  def _schedule(self) -> tuple[list[Request], list[Request]]:
    decode = [r for r in self.running if r.to_feed == 1]
    prefill = sorted((r for r in self.running if r.to_feed > 1),
                     key=lambda r: (r.arrival, r.id))[:self.config.prefill_rows]
    self._propose(decode)
    for r in sorted(decode + prefill, key=lambda r: (r.arrival, r.id)):
      if r not in self.running:
        continue  # preempted for an older request in this loop
      n = min(r.to_feed, self.config.prefill_chunk) + len(r.drafts)
      while True:
        try:
          self._reserve(r, n)
          break
        except OutOfPages:
          victim = max(self.running, key=lambda q: (q.arrival, q.id))
          self._preempt(victim)
          if victim is r:
            break
    return ([r for r in decode if r in self.running],
            [r for r in prefill if r in self.running])

  # ------------------------------------------------------------------------------ the step

  def table_widths(self) -> list[int]:
    """The page-table widths a step may use: powers of two from MIN_TABLE_WIDTH up, capped
    at pages_per_seq. A step's table is only as wide as its longest row needs, so attention
    does not sweep max_seq_len every step, at the price of one compile per width."""
    widths, w = [], min(MIN_TABLE_WIDTH, self.pages_per_seq)
    while w < self.pages_per_seq:
      widths.append(w)
      w *= 2
    return widths + [self.pages_per_seq]

  def _table_width(self, rows: list[Request]) -> int:
    need = max((len(r.pages) for r in rows), default=1)
    return next(w for w in self.table_widths() if w >= need)

  def _group(self, rows: list[Request | None], t: int, width: int,
             sample_all: bool = False) -> _Group:
    """Host arrays for `rows` (None: an inactive row) of the step's forward."""
    n_rows, v = len(rows), self.cfg.vocab_size
    tokens = np.zeros((n_rows, t), np.int32)
    n_real = np.zeros((n_rows,), np.int32)
    start = np.zeros((n_rows,), np.int32)
    table = np.full((n_rows, width), NULL_PAGE, np.int32)
    seeds = np.zeros((n_rows,), np.uint32)
    counter = np.zeros((n_rows,), np.int32)
    seen = np.zeros((n_rows, v if self.features.penalty else 1), bool)
    settings = []
    for i, r in enumerate(rows):
      settings.append(SamplingParams() if r is None else r.sampling)
      if r is None:
        continue
      fed = r.tokens[r.computed:r.computed + t] + r.drafts
      n = min(len(fed), t)
      tokens[i, :n] = fed[:n]
      n_real[i], start[i] = n, r.computed
      table[i, :len(r.pages)] = r.pages
      seeds[i], counter[i] = r.seed, len(r.output)
      if self.features.penalty:
        if r.seen is None:  # first step that needs it (also after preemption)
          r.seen = np.zeros(v, bool)
          r.seen[r.tokens] = True
        seen[i] = r.seen
    allowed = None
    if self.constrained:
      allowed = structured.bitmask([None if r is None else r.matcher for r in rows], v)
    return _Group(tokens=tokens, n_real=n_real, start=start, table=table, seeds=seeds,
                  counter=counter, sampling=SamplingBatch.of(settings), seen=seen,
                  allowed=allowed, sample_all=sample_all)

  def step(self) -> list[tuple[int, list[int]]]:
    """One scheduling round and device step; returns (request id, new tokens) pairs."""
    self._admit()
    decode, prefill = self._schedule()
    if not decode and not prefill:
      return []
    cfg = self.config
    groups, members = [], []
    width = self._table_width(decode + prefill)
    if prefill:
      rows = prefill + [None] * (cfg.prefill_rows - len(prefill))
      groups.append(self._group(rows, cfg.prefill_chunk, width))
      members.append(rows)
    if decode:
      rows = [None] * cfg.max_batch
      for r in decode:
        rows[r.slot] = r
      t = 1 + cfg.num_draft if any(r.drafts for r in decode) else 1
      groups.append(self._group(rows, t, width, sample_all=t > 1))
      members.append(rows)
    copies = [c for r in self.running for c in r.copies]
    src, dst = self._copy_arrays()
    if copies:
      src[:len(copies)], dst[:len(copies)] = zip(*copies)
    greedy = all(r.sampling.greedy for r in decode + prefill)
    self.pools, sampled = _device_step(self.params, self.pools, src, dst, tuple(groups),
                                       cfg=self.cfg, features=self._features(greedy),
                                       top_n=cfg.top_logprobs)
    sampled = jax.device_get(sampled)  # the one host sync per step
    now = time.perf_counter()
    self.num_steps += 1
    events = []
    for rows, (toks, lps, top_ids, top_lps) in zip(members, sampled):
      per_row = toks.size // len(rows)  # 1, or each position of a drafted decode row
      tops = np.stack([top_ids, top_lps], -1).reshape(len(rows), per_row, cfg.top_logprobs, 2)
      toks, lps = toks.reshape(len(rows), -1).tolist(), lps.reshape(len(rows), -1).tolist()
      for r, tok, lp, top in zip(rows, toks, lps, tops):
        if r is None:
          continue
        r.copies = []
        r.computed += min(r.to_feed, cfg.prefill_chunk)
        if r.computed < len(r.prompt) + len(r.output):  # a prompt chunk: nothing is sampled
          self._register_full_pages(r)
          continue
        # Draft i is accepted while the token sampled before it equals it: the tokens sampled
        # up to the first that differs from its draft (or after the last draft) are new.
        n = 0
        while n < len(r.drafts) and tok[n] == r.drafts[n]:
          n += 1
        self.num_drafted += len(r.drafts)
        self.num_accepted += n
        new, done = self._append(r, tok[:n + 1], lp[:n + 1], top[:n + 1], now)
        r.computed += len(new) - 1  # the K/V of the accepted drafts it keeps are written
        self._register_full_pages(r)
        events.append((r.id, new))
        if done:
          self._finish(r, now)
    self._count_page_use()
    return events

  def _append(self, r: Request, toks: list[int], lps: list[float], tops: np.ndarray,
              now: float) -> tuple[list[int], bool]:
    """Appends sampled tokens (and their log-probabilities, and tops[i]: the top
    (token, log-probability) pairs at each) to r's output, up to the first EOS and at most
    max_new_tokens in all. Returns the tokens taken and whether r is done."""
    if r.first_token_time is None:
      r.first_token_time = now
    for i, (tok, lp) in enumerate(zip(toks, lps)):
      r.output.append(tok)
      r.logprobs.append(lp)
      if r.top_logprobs:
        r.top.append([(int(t), float(v)) for t, v in tops[i, :r.top_logprobs]])
      if r.matcher is not None:
        r.matcher.consume(tok)
      if r.seen is not None:
        r.seen[tok] = True
      if tok in r.eos_ids or len(r.output) >= r.max_new_tokens:
        return toks[:i + 1], True
    return toks, False

  def _features(self, greedy: bool) -> Features:
    """The step's static sampling features: the filters any request so far has used (so they
    compile once), and greedy_only when every row of the step is greedy."""
    return dataclasses.replace(self.features, greedy_only=greedy)

  def _count_page_use(self):
    """Adds this step's page slots in use and tokens held in them (a shared page counted
    once): 1 - filled / used is the fraction of those slots wasted, averaged over steps."""
    size = self.config.page_size
    filled = {}
    for r in self.running:
      for j, page in enumerate(r.pages):
        filled[page] = max(filled.get(page, 0), min(max(r.computed - j * size, 0), size))
    self.page_slots_used += self.allocator.num_used * size
    self.page_slots_filled += sum(filled.values())

  @property
  def page_waste(self) -> float:
    """Fraction of the page slots in use, averaged over steps, that held no token."""
    return 1.0 - self.page_slots_filled / max(self.page_slots_used, 1)

  def _copy_arrays(self):
    width = self.config.max_batch + self.config.prefill_rows  # <= one copy per request
    return np.zeros((width,), np.int32), np.zeros((width,), np.int32)

  def warmup(self, widths: Sequence[int] | None = None) -> float:
    """Compiles the step for every table width, each mix of prefill and decode rows (decode
    rows with and without drafts when speculating) and greedy or sampled batches, on idle
    rows, so serving never stops to compile. Returns the seconds it took."""
    t0 = time.perf_counter()
    cfg, src, dst = self.config, *self._copy_arrays()
    decode_tokens = [1] + ([1 + cfg.num_draft] if cfg.prompt_lookup else [])
    shapes = []
    for width in self.table_widths() if widths is None else widths:
      prefill = self._group([None] * cfg.prefill_rows, cfg.prefill_chunk, width)
      decodes = [self._group([None] * cfg.max_batch, t, width, sample_all=t > 1)
                 for t in decode_tokens]
      for groups in [(prefill,)] + [(d,) for d in decodes] + [(prefill, d) for d in decodes]:
        shapes += [(groups, greedy) for greedy in (True, False)]
    # The first step met the pools as created; every later one meets them as a step's output,
    # which carries the weights' sharding (a loaded checkpoint's mesh): to jit another
    # argument, so the first shape compiles again for it.
    for groups, greedy in shapes + shapes[:1]:
      self.pools, out = _device_step(self.params, self.pools, src, dst, groups, cfg=self.cfg,
                                     features=self._features(greedy), top_n=cfg.top_logprobs)
    jax.block_until_ready(out)
    return time.perf_counter() - t0

  def _register_full_pages(self, r: Request):
    if not self.config.prefix_caching:
      return
    p, tokens = self.config.page_size, None
    while len(r.keys) < r.computed // p:
      i = len(r.keys)
      tokens = r.tokens if tokens is None else tokens
      key = chain_hash(r.keys[-1] if r.keys else b"", tokens[i * p:(i + 1) * p])
      self.allocator.register(r.pages[i], key)
      r.keys.append(key)

  def _finish(self, r: Request, now: float):
    for page in r.pages:
      self.allocator.release(page)
    r.pages, r.keys = [], []
    r.finished, r.finish_time = True, now
    self.free_slots.append(r.slot)
    r.slot = None
    self.running.remove(r)


def serve(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
          max_new_tokens: int | Sequence[int], sampling=SamplingParams(), seed=0, eos_ids=(),
          config: EngineConfig = EngineConfig(), constraint=None) -> list[list[int]]:
  """Runs a list of prompts through a fresh engine; generated ids per prompt, in order.
  `max_new_tokens`, `sampling`, `seed` and `constraint` may be one per prompt."""
  n = len(prompts)
  per_row = lambda x: list(x) if isinstance(x, (list, tuple)) else [x] * n
  engine = Engine(cfg, params, config, eos_ids=eos_ids)
  ids = [engine.add_request(p, max_new_tokens=m, sampling=s, seed=sd, constraint=c)
         for p, m, s, sd, c in zip(prompts, per_row(max_new_tokens), per_row(sampling),
                                   per_row(seed), per_row(constraint))]
  done = engine.run()
  return [done[i].tokens for i in ids]
