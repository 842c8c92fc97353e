"""Batched generation: prefill ragged prompts, then a `lax.while_loop` until every row stops.

Everything between the prompt and the last token runs inside one jitted program: no host
round-trip per token. Prompts are right-padded: a real token never attends to the padding after
it (causality) and each row attends only to its own cache row, so no row sees another row's
padding; the cache length advances by the real tokens only, so decoding overwrites the pads.

Shapes are bucketed (batch, prompt length and new-token budget rounded up to powers of two), so
the program compiles once per bucket; per-row limits and settings are array inputs.

With `draft=` the loop is speculative (infer/speculative.py): same state, more tokens per step.
Both loops and the engine (infer/engine.py) run the one step of infer/step.py.

With `return_logprobs=True` each generated token also comes with its log-probability under the
row's tempered distribution before any filter, log_softmax(logits / T)[token] (T = 1 for greedy
rows), which is what PPO/GRPO need as the behaviour policy's log-probs. That equals the
distribution the token was drawn from only under temperature-only sampling (no top-k, top-p,
min-p or repetition penalty), so RL rollouts should sample that way.

The forward is the model's, over weights laid out once for decoding (model/fused.py: fused QKV
and gate/up; [out, in] matrices for one row at a time, [in, out] for batches and speculative
verification: `layout_for`); `generate*` accept the module's parameter tree or an already
prepared one (`fused.prepare`: prepare once to reuse).
"""

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer import sampling as sampling_lib
from infer import speculative, step, structured
from infer.sampling import Features, SamplingBatch, SamplingParams
from infer.step import DecodeState, commit, emit, token_logprobs
from model import ModelConfig, fused, kv_cache


def bucket(n: int, minimum: int = 8) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _forward_live(cfg: ModelConfig, params, s: DecodeState):
  """f32[B, V] logits after each row's last token, and the cache holding it."""
  logits, cache = step.forward(cfg, params, s.last_tokens()[:, None], s.cache)
  # A finished row's cache stops advancing, so it can never run past the cache's end.
  return logits[:, 0], cache.replace(lengths=jnp.where(s.done, s.cache.lengths, cache.lengths))


def _sample_commit(s: DecodeState, logits_BV, eos_ids, sink_id, allowed_BW, *,
                   features: Features, stream: int) -> tuple[DecodeState, jax.Array]:
  """Samples each row's next token from `logits_BV` (s.cache already holds the last one),
  masked by the packed bitmask `allowed_BW` (None: unconstrained), and appends it."""
  keys = sampling_lib.token_keys(s.keys, s.num_generated)
  tok = sampling_lib.sample_rows(keys, logits_BV, s.sampling, features, s.seen, allowed_BW)
  live = (~s.done).astype(jnp.int32)
  # Static: the state's structure says whether log-probs are kept (None otherwise).
  lp = None if s.logprobs is None else token_logprobs(logits_BV, tok, s.sampling.temperature)
  s2, _ = commit(s, tok[:, None], jnp.ones_like(live), eos_ids, None if lp is None else lp[:, None])
  s2 = s2.replace(step=s.step + 1, target_steps=s.target_steps + live)
  emit(stream, sink_id, s2, stream, (s2.step % max(stream, 1) == 0) | jnp.all(s2.done))
  return s2, tok


@functools.partial(jax.jit, static_argnames=("cfg", "features", "stream"),
                   donate_argnames=("s",))
def _decode_loop(params, s: DecodeState, eos_ids, sink_id, *, cfg: ModelConfig,
                 features: Features, stream: int) -> DecodeState:
  def body(s: DecodeState):
    logits, cache = _forward_live(cfg, params, s)
    return _sample_commit(s.replace(cache=cache), logits, eos_ids, sink_id, None,
                          features=features, stream=stream)[0]

  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, s)


# Structured output: the mask of step n depends on the token of step n-1, so the loop comes back
# to the host each step. The step is split in two programs so that the forward (which needs no
# mask) runs on the device while the host computes the mask (llguidance releases the GIL).
@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _forward_step(params, s: DecodeState, cache, *, cfg: ModelConfig):
  return _forward_live(cfg, params, s.replace(cache=cache))


_sample_step = jax.jit(_sample_commit, static_argnames=("features", "stream"),
                       donate_argnames=("s",))


def _constrained_loop(params, s: DecodeState, eos_ids, sink_id,
                      matchers: Sequence[structured.Matcher | None], *, cfg: ModelConfig,
                      features: Features, stream: int) -> DecodeState:
  """The decode loop driven from the host, for rows with a `structured.Matcher` (None: free).
  `s` comes from prefill, its first token sampled under the matchers' first masks."""
  consumed = np.zeros(len(matchers), np.int64)  # tokens each matcher has seen
  tok = s.last_tokens()
  while True:
    # Dispatched before the host waits for the tokens: at the end it is one forward wasted.
    logits, cache = _forward_step(params, s.replace(cache=None), s.cache, cfg=cfg)
    s = s.replace(cache=cache)
    tok_B, generated_B, done_B = jax.device_get((tok, s.num_generated, s.done))
    for i, m in enumerate(matchers):
      if m is not None and generated_B[i] > consumed[i]:
        m.consume(tok_B[i])
        consumed[i] = generated_B[i]
    if done_B.all():
      return s
    allowed_BW = structured.bitmask([None if d else m for m, d in zip(matchers, done_B)],
                                    cfg.vocab_size)
    s, tok = _sample_step(s, logits, eos_ids, sink_id, allowed_BW, features=features,
                          stream=stream)


@dataclasses.dataclass
class Generation:
  """What `generate_with_stats` returns: tokens per prompt (prompt excluded, cut after the
  first EOS) and measurements of the run."""
  tokens: list[list[int]]
  prefill_s: float
  decode_s: float
  prompt_tokens: int
  target_steps: list[int]  # target forwards per row after prefill
  drafted: list[int]  # speculative: draft tokens proposed per row
  accepted: list[int]  # speculative: draft tokens accepted per row
  # With return_logprobs: log_softmax(logits / T)[token] per token, aligned with `tokens`.
  logprobs: list[list[float]] | None = None

  @property
  def generated_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def acceptance_rate(self) -> float:
    return sum(self.accepted) / max(sum(self.drafted), 1)

  @property
  def tokens_per_step(self) -> float:
    """Tokens emitted per target forward in the loop (the first token comes from prefill)."""
    return (self.generated_tokens - len(self.tokens)) / max(sum(self.target_steps), 1)

  def stats(self) -> dict:
    out = {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
           "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
           "prefill_tokens_per_s": self.prompt_tokens / max(self.prefill_s, 1e-9),
           "decode_tokens_per_s": (self.generated_tokens - len(self.tokens))
                                  / max(self.decode_s, 1e-9),
           "target_steps": sum(self.target_steps), "tokens_per_step": self.tokens_per_step}
    if sum(self.drafted):
      out["acceptance_rate"] = self.acceptance_rate
    return out


def _per_row(value, n: int, name: str) -> list:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
    return list(value)
  return [value] * n


def row_keys(seed, n: int):
  """Per-row keys: a list of seeds gives each row PRNGKey(seed_i), so a row samples the same
  tokens alone or in any batch; one int seed gives fold_in(PRNGKey(seed), row)."""
  if isinstance(seed, (list, tuple)):
    return sampling_lib.row_keys(np.asarray(seed, np.uint32))
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


def layout_for(batch: int, speculative: bool) -> str:
  """The weight layout (model/fused.py) for decoding `batch` rows: one token of one row per
  forward streams fastest [out, in]; several rows (a batch, or k+1 tokens to verify) [in, out].
  Prepare params with it to reuse them across calls."""
  return "out_in" if bucket(batch, 1) == 1 and not speculative else "in_out"


def generate_with_stats(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                        max_new_tokens: int | Sequence[int],
                        sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                        eos_ids=(), seed: int | Sequence[int] = 0, draft=None,
                        num_draft_tokens: int = 4,
                        stream: Callable[[int, list[int]], None] | None = None,
                        stream_every: int = 8, cache_dtype=None,
                        return_logprobs: bool = False,
                        constraint: structured.Constraint | None
                        | Sequence[structured.Constraint | None] = None) -> Generation:
  """Generates for a batch of token-id prompts. Per-row `max_new_tokens`, `sampling` and
  `seed` may be lists. `params`: the module's tree or `fused.prepare(cfg, params)`. `draft`:
  None, `speculative.ModelDraft(cfg, params)`, `speculative.EarlyExit(n_layers)` or
  `speculative.PromptLookup(ngram)`. `stream(row, new_token_ids)` is called as tokens come,
  every `stream_every` steps (each callback from the loop costs about one small step on CPU).
  `cache_dtype`: the KV cache's, "bfloat16", "float32" or "int8" (quantized per token and
  KV head); None: the compute dtype. `return_logprobs`: also return each generated token's log_softmax(logits / T)[token] (T = 1
  for greedy rows; before top-k/top-p/min-p/penalty: sample RL rollouts with temperature only).
  """
  if return_logprobs and draft is not None:
    raise ValueError("return_logprobs is not supported with speculative decoding (draft=...): "
                     "the speculative loop does not record them; sample rollouts without a draft")

  n = len(prompts)
  if n == 0 or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  constraints = _per_row(constraint, n, "constraint")
  if any(c is not None for c in constraints):
    if draft is not None:
      raise ValueError("structured output (constraint=) is not supported with speculative "
                       "decoding (draft=...); drop one")
    for c in constraints:
      if c is not None and not set(c.eos_ids) <= set(int(e) for e in eos_ids):
        raise ValueError(f"{c.source}: its grammar ends with EOS {list(c.eos_ids)}, which must "
                         f"be among eos_ids={list(eos_ids)}")
  max_new = _per_row(max_new_tokens, n, "max_new_tokens")
  params_rows = _per_row(sampling, n, "sampling")
  for i, (p, m) in enumerate(zip(prompts, max_new)):
    limit = cfg.max_seq_len if draft is None else speculative.max_seq_len(cfg, draft)
    if len(p) + m > limit:
      raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={m} that exceeds "
                       f"the model's context of {limit} tokens (model.max_seq_len)")
  eos_ids = tuple(int(e) for e in eos_ids)
  if cache_dtype is not None:  # "int8": the quantized cache (model/kv_cache.py)
    cache_dtype = kv_cache.storage_dtype(cfg, cache_dtype, "cache_dtype")
  params = fused.prepare(cfg, params, layout=layout_for(n, draft is not None))
  # The forward needs no layer structure from the config: one static config per model shape.
  cfg = dataclasses.replace(cfg, scan_layers=False, remat="none")
  if isinstance(draft, speculative.EarlyExit):
    draft = speculative.early_exit_draft(cfg, params, draft.n_layers)
  elif isinstance(draft, speculative.ModelDraft):
    draft = speculative.ModelDraft(
        dataclasses.replace(draft.cfg, scan_layers=False, remat="none"),
        fused.prepare(draft.cfg, draft.params, layout=layout_for(n, speculative=False)))
  eos_arr = np.full((bucket(len(eos_ids), 4),), -1, np.int32)  # an input: no recompile
  eos_arr[:len(eos_ids)] = eos_ids
  k = num_draft_tokens if draft is not None else 0
  if draft is not None:
    speculative.check_draft(cfg, draft, k)

  b, t = bucket(n, 1), bucket(max(len(p) for p in prompts))
  new_bucket = bucket(max(max_new))
  cache_len = t + new_bucket + (k + 1 if k else 0)
  batch = np.zeros((b, t), np.int32)
  lens = np.ones((b,), np.int32)
  for i, p in enumerate(prompts):
    batch[i, :len(p)], lens[i] = p, len(p)
  max_new_arr = np.zeros((b,), np.int32)  # padding rows start done
  max_new_arr[:n] = max_new
  params_rows = params_rows + [params_rows[0]] * (b - n)
  features = Features.of(params_rows)
  sampling_arr = SamplingBatch.of(params_rows)
  seeds = _per_row(seed, n, "seed") if isinstance(seed, (list, tuple)) else seed
  keys = row_keys(seeds + [0] * (b - n) if isinstance(seeds, list) else seeds, b)

  sink_id = next(step.SINK_IDS)
  if stream is not None:
    step.SINKS[sink_id] = step.StreamSink(lambda row, toks: row < n and stream(row, toks), b)
  static = dict(cfg=cfg, features=features, stream=0 if stream is None else max(stream_every, 1))
  try:
    t0 = time.perf_counter()
    if draft is None:
      matchers = [None if c is None else c.matcher() for c in constraints] + [None] * (b - n)
      constrained = any(m is not None for m in matchers)
      s = step.prefill_state(params, batch, lens, max_new_arr, keys, sampling_arr, eos_arr, sink_id,
                             structured.bitmask(matchers, cfg.vocab_size) if constrained else None,
                             cache_len=cache_len, cache_dtype=cache_dtype,
                             return_logprobs=return_logprobs, **static)
      jax.block_until_ready(s)
      t1 = time.perf_counter()
      if constrained:
        s = _constrained_loop(params, s, eos_arr, sink_id, matchers, **static)
      else:
        s = _decode_loop(params, s, eos_arr, sink_id, **static)
    else:
      s = speculative.prefill(params, draft, batch, lens, max_new_arr, keys, sampling_arr,
                              eos_arr, sink_id, cache_len=cache_len, cache_dtype=cache_dtype,
                              **static)
      jax.block_until_ready(s)
      t1 = time.perf_counter()
      s = speculative.decode_loop(params, draft, s, eos_arr, sink_id, num_draft=k, **static)
    tokens, ctx, plens = jax.device_get((s.tokens, s.context_lens, s.prompt_lens))
    t2 = time.perf_counter()
    if stream is not None:
      jax.effects_barrier()
  finally:
    step.SINKS.pop(sink_id, None)
  stats = jax.device_get((s.target_steps, s.drafted, s.accepted))
  out = [tokens[i, plens[i]:ctx[i]].tolist() for i in range(n)]
  logprobs = None
  if return_logprobs:
    lp = jax.device_get(s.logprobs)
    logprobs = [lp[i, plens[i]:ctx[i]].tolist() for i in range(n)]
  return Generation(tokens=out, prefill_s=t1 - t0, decode_s=t2 - t1,
                    prompt_tokens=int(sum(len(p) for p in prompts)),
                    target_steps=stats[0][:n].tolist(), drafted=stats[1][:n].tolist(),
                    accepted=stats[2][:n].tolist(), logprobs=logprobs)


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int | Sequence[int],
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             eos_ids=(), seed: int | Sequence[int] = 0, **kwargs) -> list[list[int]]:
  """Generated token ids per prompt (prompt excluded), cut after the first EOS.
  Keyword arguments as `generate_with_stats`."""
  return generate_with_stats(cfg, params, prompts, max_new_tokens=max_new_tokens,
                             sampling=sampling, eos_ids=eos_ids, seed=seed, **kwargs).tokens
