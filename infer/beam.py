"""Beam search over the contiguous KV cache: prefill once, then one jitted `lax.while_loop`.

Each prompt is prefilled once; its cache row is then copied to its W beams by a gather (the
prompt is never recomputed), and after every step the beams' rows are gathered again by their
parents. The selection follows transformers' `GenerationMixin._beam_search` (5.x) step by step,
so greedy beam search gives the same tokens as `generate(num_beams=W, do_sample=False)`:

* Scores are sums of log_softmax(logits) in f32. Beam 0 starts at 0, the others at -1e9, so
  the first step expands one copy of the prompt.
* Each step keeps the top C = max(2, 1 + #EOS) * W candidates over W x V. A candidate "ends"
  when its token is an EOS or it reaches max_new_tokens. The best W candidates that did not
  end are the next beams.
* Ended candidates among the top W (by rank, not only the live ones) enter a pool of W
  hypotheses per prompt, scored sum_logprobs / n ** length_penalty with n the generated
  tokens, the EOS included.
* A prompt is done once its pool is full and even its best live beam can no longer beat the
  pool's worst: best_sum / n ** length_penalty with n the tokens so far (with early_stopping
  "never" and length_penalty > 0, n = max_new_tokens); early_stopping=True stops a prompt as
  soon as its pool is full. A done prompt's pool no longer changes.
* At max_new_tokens the top W candidates all end, so every pool holds W hypotheses.

Transformers marks what may not enter the pool or the beams by adding -1e9 to its score; so
does this, in the same order. The length penalties n ** length_penalty are computed on the
host in float64, as Python does for transformers, and passed in as a table.

The reordering gather copies every beam's cache row each step (transformers' reorder_cache
does the same): reads of the order of one attention pass over the cache. Sharing pages
copy-on-write in the paged engine would avoid the copy; this loop keeps the contiguous cache.

Letters: P prompts, W beams, C candidates per prompt, R = P * W cache rows, V vocabulary,
N the generated-token buffer.
"""

import dataclasses
import functools
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from infer import step
from infer.decode import bucket, layout_for
from model import KVCache, ModelConfig, fused, kv_cache

NEG = -1.0e9  # transformers' "impossible" score


@flax.struct.dataclass
class BeamSettings:
  """The search's settings as arrays: changing them does not recompile."""
  eos_ids: jax.Array  # int32[E], padded with -1
  max_new: jax.Array  # int32[]
  penalty_N: jax.Array  # f32[N + 1]: n ** length_penalty
  stop_when_full: jax.Array  # bool[]: early_stopping=True
  # bool[]: early_stopping="never" with length_penalty > 0: a live beam is judged by the score
  # it would have at max_new tokens, else at its current length.
  judge_at_max: jax.Array


@flax.struct.dataclass
class BeamState:
  step: jax.Array  # int32[]: tokens generated so far by every live beam
  cache: KVCache  # R rows: prompt and beam tokens, all but each beam's last
  tokens_PWN: jax.Array  # int32: the live beams' generated tokens
  scores_PW: jax.Array  # f32: their summed log-probabilities, best first
  hyp_tokens_PWN: jax.Array  # int32: the pool of ended hypotheses, best first
  hyp_scores_PW: jax.Array  # f32: their length-penalised scores (-1e9 and below: empty)
  hyp_lens_PW: jax.Array  # int32: their generated tokens, the EOS included
  hyp_done_PW: jax.Array  # bool: the slot holds a hypothesis
  open_P: jax.Array  # bool: the prompt's pool can still improve


def _select(s: BeamState, logits_RV, c: BeamSettings, num_candidates: int) -> BeamState:
  """One step of transformers' beam search from the R beams' next-token logits f32[R, V]."""
  p, w, _ = s.tokens_PWN.shape
  v = logits_RV.shape[-1]
  logp_PWV = jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1).reshape(p, w, v)
  total_PWV = logp_PWV + s.scores_PW[:, :, None]
  cand_PC, flat_PC = jax.lax.top_k(total_PWV.reshape(p, w * v), num_candidates)
  parent_PC, token_PC = flat_PC // v, flat_PC % v
  cand_tokens_PCN = jnp.take_along_axis(s.tokens_PWN, parent_PC[:, :, None], axis=1)
  cand_tokens_PCN = cand_tokens_PCN.at[:, :, s.step].set(token_PC)
  length = s.step + 1
  ends_PC = jnp.isin(token_PC, c.eos_ids) | (length >= c.max_new)

  # The next live beams: the best W candidates that did not end.
  live_PC = cand_PC + ends_PC.astype(jnp.float32) * NEG
  _, keep_PW = jax.lax.top_k(live_PC, w)
  tokens_PWN = jnp.take_along_axis(cand_tokens_PCN, keep_PW[:, :, None], axis=1)
  scores_PW = jnp.take_along_axis(live_PC, keep_PW, axis=1)
  parent_PW = jnp.take_along_axis(parent_PC, keep_PW, axis=1)

  # The pool: ended candidates ranked among the top W, unless the prompt is done.
  ended_PC = ends_PC & (jnp.arange(num_candidates) < w)[None, :]
  hyp_PC = cand_PC / c.penalty_N[length]
  full_P1 = jnp.all(s.hyp_done_PW, axis=1, keepdims=True) & c.stop_when_full
  hyp_PC += full_P1.astype(jnp.float32) * NEG
  hyp_PC += (~s.open_P[:, None]).astype(jnp.float32) * NEG
  hyp_PC += (~ended_PC).astype(jnp.float32) * NEG
  merged_scores = jnp.concatenate([s.hyp_scores_PW, hyp_PC], axis=1)
  _, best_PW = jax.lax.top_k(merged_scores, w)

  def pick(old_PW, new_PC):  # also [P, W, N] and [P, C, N]
    merged = jnp.concatenate([old_PW, new_PC], axis=1)
    index = best_PW.reshape(best_PW.shape + (1,) * (merged.ndim - 2))
    return jnp.take_along_axis(merged, index, axis=1)

  hyp_tokens_PWN = pick(s.hyp_tokens_PWN, cand_tokens_PCN)
  hyp_scores_PW = pick(s.hyp_scores_PW, hyp_PC)
  hyp_lens_PW = pick(s.hyp_lens_PW, jnp.broadcast_to(length, hyp_PC.shape))
  hyp_done_PW = pick(s.hyp_done_PW, ended_PC)

  # Can the best live beam still beat the pool's worst? (transformers' early-stop heuristic)
  best_P = scores_PW[:, 0] / c.penalty_N[jnp.where(c.judge_at_max, c.max_new, length)]
  worst_PW = jnp.where(hyp_done_PW, jnp.min(hyp_scores_PW, axis=1, keepdims=True), NEG)
  open_P = s.open_P & jnp.any(best_P[:, None] > worst_PW, axis=1)

  rows_R = (jnp.arange(p)[:, None] * w + parent_PW).reshape(-1)
  return s.replace(step=length, cache=s.cache.take_rows(rows_R), tokens_PWN=tokens_PWN,
                   scores_PW=scores_PW, hyp_tokens_PWN=hyp_tokens_PWN,
                   hyp_scores_PW=hyp_scores_PW, hyp_lens_PW=hyp_lens_PW,
                   hyp_done_PW=hyp_done_PW, open_P=open_P)


def _running(s: BeamState, c: BeamSettings) -> jax.Array:
  return (s.step < c.max_new) & jnp.any(s.open_P) & ~(jnp.all(s.hyp_done_PW) & c.stop_when_full)


@functools.partial(jax.jit, static_argnames=("cfg", "num_beams", "num_candidates", "new_len",
                                             "cache_len", "cache_dtype"))
def _beam_search(params, prompts_PT, prompt_lens_P, real_P, c: BeamSettings, *,
                 cfg: ModelConfig, num_beams: int, num_candidates: int, new_len: int,
                 cache_len: int, cache_dtype) -> BeamState:
  p, w = prompts_PT.shape[0], num_beams
  cache = step.init_cache(cfg, p, cache_len, cache_dtype)
  logits_PV, cache = step.prefill(cfg, params, prompts_PT, prompt_lens_P, cache)
  beams_R = jnp.repeat(jnp.arange(p), w)  # each prompt's row, shared by its beams
  empty_PWN = jnp.zeros((p, w, new_len), jnp.int32)
  first_W = jnp.where(jnp.arange(w) == 0, 0.0, NEG).astype(jnp.float32)
  s = BeamState(step=jnp.int32(0), cache=cache.take_rows(beams_R), tokens_PWN=empty_PWN,
                scores_PW=jnp.broadcast_to(first_W, (p, w)), hyp_tokens_PWN=empty_PWN,
                hyp_scores_PW=jnp.full((p, w), NEG, jnp.float32),
                hyp_lens_PW=jnp.zeros((p, w), jnp.int32),
                # Padding rows start done, so they never hold the loop open.
                hyp_done_PW=jnp.broadcast_to(~real_P[:, None], (p, w)), open_P=real_P)
  s = _select(s, logits_PV[beams_R], c, num_candidates)

  def body(s: BeamState) -> BeamState:
    last_R = s.tokens_PWN[:, :, s.step - 1].reshape(-1)
    logits, cache = step.forward(cfg, params, last_R[:, None], s.cache)
    return _select(s.replace(cache=cache), logits[:, 0], c, num_candidates)

  return jax.lax.while_loop(lambda s: _running(s, c), body, s)


@dataclasses.dataclass
class Beams:
  """What `beam_search` returns per prompt: the best num_return_sequences hypotheses, best
  first (generated tokens only, the EOS included when one ended it), and their scores
  sum_logprobs / len ** length_penalty."""
  tokens: list[list[list[int]]]
  scores: list[list[float]]


def check_early_stopping(value):
  """True, False or "never" (also "true"/"false", as a command line gives them)."""
  if isinstance(value, str):
    value = {"true": True, "false": False}.get(value.lower(), value)
  if not (isinstance(value, bool) or value == "never"):
    raise ValueError(f"early_stopping must be one of True, False or 'never', got {value!r}")
  return value


def beam_search(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, num_beams: int,
                max_new_tokens: int, length_penalty: float = 1.0, early_stopping=False,
                num_return_sequences: int = 1, eos_ids=(), cache_dtype=None) -> Beams:
  """Greedy beam search with transformers' semantics (module docstring) for a batch of
  token-id prompts. `params`: the module's tree or `fused.prepare(cfg, params)`.
  `early_stopping`: True, False or "never"; `cache_dtype` as in `decode.generate`."""
  n = len(prompts)
  if n == 0 or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if not isinstance(num_beams, int) or num_beams < 1:
    raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
  if not 1 <= num_return_sequences <= num_beams:
    raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], "
                     f"got {num_return_sequences}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  early_stopping = check_early_stopping(early_stopping)
  for i, p in enumerate(prompts):
    if len(p) + max_new_tokens > cfg.max_seq_len:
      raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} "
                       f"that exceeds the model's context of {cfg.max_seq_len} tokens "
                       "(model.max_seq_len)")
  eos_ids = tuple(int(e) for e in eos_ids)
  num_candidates = max(2, 1 + len(eos_ids)) * num_beams
  if num_candidates > num_beams * cfg.vocab_size:
    raise ValueError(f"num_beams={num_beams} with {len(eos_ids)} EOS ids needs "
                     f"{num_candidates} candidates, more than num_beams x vocab_size = "
                     f"{num_beams * cfg.vocab_size}")
  if cache_dtype is not None:
    cache_dtype = kv_cache.storage_dtype(cfg, cache_dtype, "cache_dtype")

  rows = bucket(n, 1) * num_beams
  params = fused.prepare(cfg, params, layout=layout_for(rows, speculative=False))
  cfg = dataclasses.replace(cfg, scan_layers=False, remat="none")
  p, t, new_len = bucket(n, 1), bucket(max(len(q) for q in prompts)), bucket(max_new_tokens)
  prompts_PT = np.zeros((p, t), np.int32)
  lens_P = np.ones((p,), np.int32)
  for i, q in enumerate(prompts):
    prompts_PT[i, :len(q)], lens_P[i] = q, len(q)
  eos_arr = np.full((bucket(len(eos_ids), 4),), -1, np.int32)
  eos_arr[:len(eos_ids)] = eos_ids
  # n ** length_penalty in float64, as Python computes it for transformers, then f32 (entry 0,
  # never read, is 1: no hypothesis is empty).
  lengths_N = np.maximum(np.arange(new_len + 1), 1).astype(np.float64)
  penalty_N = (lengths_N ** length_penalty).astype(np.float32)
  settings = BeamSettings(
      eos_ids=eos_arr, max_new=np.int32(max_new_tokens), penalty_N=penalty_N,
      stop_when_full=np.bool_(early_stopping is True),
      judge_at_max=np.bool_(early_stopping == "never" and length_penalty > 0))
  s = _beam_search(params, prompts_PT, lens_P, np.arange(p) < n, settings, cfg=cfg,
                   num_beams=num_beams, num_candidates=num_candidates, new_len=new_len,
                   cache_len=t + new_len, cache_dtype=cache_dtype)
  tokens, scores, lens = jax.device_get((s.hyp_tokens_PWN, s.hyp_scores_PW, s.hyp_lens_PW))
  r = num_return_sequences
  return Beams(tokens=[[tokens[i, j, :lens[i, j]].tolist() for j in range(r)] for i in range(n)],
               scores=[scores[i, :r].tolist() for i in range(n)])
