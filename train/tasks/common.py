"""What several tasks share: the policy's trainable tree (every weight, or LoRA adapters over a
frozen base), loading frozen models, log-probabilities of completions, and scoring greedy
answers with a reward function."""

import dataclasses
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infer import workdir as run_dir
from infer.decode import generate
from infer.sampling import SamplingParams
from model import ModelConfig, Transformer, head, lora, quant, sharding
from train import objectives, posttrain_data
from train.config import ConfigError, import_function
from train.tasks import pretrain


@dataclasses.dataclass(frozen=True)
class Policy:
  """The language model a task trains: all of its weights, or LoRA adapters (Hu et al. 2021)
  over a frozen base. With LoRA the base is frozen["base"], the trained tree is the adapters,
  and "adapters off" (the base itself) is the DPO/PPO/GRPO reference: no second copy."""
  model_cfg: ModelConfig
  init_from: str
  rank: int = 0
  alpha: float = 16.0
  targets: str = ""
  # The frozen base's quantization, None if dense: init_from's own (a run written by
  # train/convert.py --quantize), or lora.base_quant's. With LoRA the base stays quantized
  # (QLoRA's setting: Dettmers et al. 2023); full fine-tuning, and the merged model LoRA
  # exports, start from or hold its dequantized weights.
  base_quant: quant.Spec | None = None
  # Whether the base is quantized here (lora.base_quant over a dense or random base), not
  # stored so.
  quantize_base: bool = False
  seed: int = 0  # the random base's, when there is no init_from

  @classmethod
  def of(cls, cfg, model_cfg: ModelConfig) -> "Policy":
    if cfg.lora.rank < 0:
      raise ConfigError(f"lora.rank={cfg.lora.rank} must be >= 0")
    try:
      lora.parse_targets(cfg.lora.targets)
    except ValueError as e:
      raise ConfigError(f"lora.targets: {e}") from None
    wanted = base_quant_spec(cfg.lora)
    if wanted is not None and not cfg.lora.rank:
      raise ConfigError(f"lora.base_quant={cfg.lora.base_quant!r} quantizes LoRA's frozen base: "
                        "set lora.rank > 0 (full fine-tuning trains dense weights)")
    stored = None
    if cfg.lora.rank and cfg.train.init_from:  # elsewhere load_params dequantizes
      try:
        stored = run_dir.load_quant(cfg.train.init_from)
      except FileNotFoundError:  # no run there: loading the base says so, when it is loaded
        pass
    if stored is not None and wanted is not None and (
        dataclasses.replace(stored, method=wanted.method) != wanted):
      raise ConfigError(
          f"lora.base_quant={cfg.lora.base_quant!r} (group {wanted.group}) asks for another "
          f"layout than train.init_from={cfg.train.init_from!r} is stored in "
          f"({stored.kind}, group {stored.group}, symmetric={stored.symmetric}, double_quant="
          f"{stored.double_quant}): set lora.base_quant='' to train over it as stored, or "
          "start from a dense run")
    return cls(model_cfg, cfg.train.init_from, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets,
               stored or wanted, quantize_base=stored is None and wanted is not None,
               seed=cfg.seed)

  @property
  def model(self) -> Transformer:
    return Transformer(self.model_cfg)

  def init_model(self, rng):
    return pretrain.init_model(self.model, rng)

  def init(self, rng):
    """The trained tree, boxed."""
    if not self.rank:
      return self.init_model(rng)
    base = self.init_model(rng)  # only its shapes and names are read
    return lora.init_adapters(base, targets=self.targets, rank=self.rank, rng=rng)

  def frozen_base(self, boxed):
    """The frozen base's tree as it loads (shapes and names): quantized like init_from, or
    as lora.base_quant says."""
    if self.base_quant is None:
      return boxed
    if self.quantize_base:
      try:
        self.base_quant.check(nn.unbox(boxed))
      except ValueError as e:
        raise ConfigError(f"lora.base_quant_group: {e}") from None
    return self.base_quant.quantize(boxed)

  def init_frozen(self, rng):
    return {"base": self.frozen_base(self.init_model(rng))} if self.rank else {}

  def init_frozen_with_reference(self, rng):
    """Frozen arrays of a task with a reference: LoRA's base (the reference itself), or a
    copy of the starting model."""
    return self.init_frozen(rng) if self.rank else {"reference": self.init_model(rng)}

  def params(self, trained, frozen):
    """The model's parameters as a training step runs them: with LoRA, the base with its
    adapters attached, applied unmerged (model/lora.py)."""
    if not self.rank:
      return trained
    return lora.attach(frozen["base"], trained, rank=self.rank, alpha=self.alpha)

  def merged(self, trained, frozen):
    """The model's parameters as plain weights (adapters merged): export, decoding. Over a
    quantized base these are its dequantized weights plus the adapters' products."""
    if not self.rank:
      return trained
    merged = lora.merge(frozen["base"], trained, rank=self.rank, alpha=self.alpha)
    return quant.dequantize_params(merged)  # the weights no adapter touched, of a quantized base

  def reference(self, frozen):
    """The frozen reference: the base with adapters off, or frozen["reference"]."""
    return frozen["base"] if self.rank else frozen["reference"]

  def load_frozen(self, shardings, reference: str = ""):
    """{"base": ...} with LoRA (which is also the reference); else {"reference": ...} when
    `reference` names a run to load."""
    out = {}
    if self.rank:
      out["base"] = self.load_base(shardings["base"])
    elif reference:
      out["reference"] = run_dir.load_params(reference, self.model_cfg,
                                             shardings=shardings["reference"])
    return out

  def load_base(self, shardings, init_base=None, load=None):
    """LoRA's frozen base placed on `shardings` (those of `frozen_base`'s tree): init_from as
    stored; or loaded dense and quantized here (lora.base_quant), one jitted pass whose input
    is donated; or, with no init_from, random (for tests and dry runs).

    init_base: rng -> the dense base, boxed (default: the whole model). load: shardings -> the
    stored base placed on them (default: init_from's parameters)."""
    init_base = init_base or self.init_model
    if load is None:
      load = lambda s: run_dir.load_params(self.init_from, self.model_cfg, shardings=s)
    if not self.init_from:
      print("lora: no train.init_from: the frozen base is randomly initialised", flush=True)
      init = lambda: nn.unbox(self.frozen_base(init_base(jax.random.PRNGKey(self.seed))))
      return jax.jit(init, out_shardings=shardings)()
    if not self.quantize_base:
      return load(shardings)
    mesh = jax.tree.leaves(shardings)[0].mesh
    dense = load(sharding.shardings_for(jax.eval_shape(init_base, jax.random.PRNGKey(0)), mesh))
    with warnings.catch_warnings():
      # Donated: the weights that stay dense (embedding, norms) pass through uncopied; the
      # matmuls' buffers cannot hold their codes, which XLA says, harmlessly.
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      return jax.jit(self.base_quant.quantize, out_shardings=shardings,
                     donate_argnums=0)(dense)

  def start(self, params, frozen):
    """Adapters start fresh (B = 0); full fine-tuning starts from train.init_from."""
    del frozen
    if self.rank or not self.init_from:
      return params
    return run_dir.load_params(self.init_from, self.model_cfg, shardings=shardings_of(params))


def base_quant_spec(lora_cfg) -> quant.Spec | None:
  """lora.base_quant's layout (None when empty): QLoRA's NF4 with double-quantized scales
  (Dettmers et al. 2023, Sec. 3: blocks of lora.base_quant_group weights, their scales in int8
  blocks of 256, model/quant.py DoubleQuantized), or symmetric int8 / int4."""
  kind, group = lora_cfg.base_quant, lora_cfg.base_quant_group
  if not kind:
    return None
  if kind not in quant.KINDS:
    raise ConfigError(f"lora.base_quant={kind!r} is not one of {['', *quant.KINDS]}")
  if group < 0:
    raise ConfigError(f"lora.base_quant_group={group} must be >= 0 (0: per output channel)")
  return quant.Spec(kind, group=group, double_quant=kind == "nf4")


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def value_from_lm(lm_params, value_params):
  """A value model's parameters from a language model's: its backbone, with the value
  head of `value_params` (a fresh one) instead of the LM head."""
  out = {k: v for k, v in lm_params.items() if k != "lm_head"}
  out["value_head"] = value_params["value_head"]
  return out


def value_config(model_cfg: ModelConfig) -> ModelConfig:
  return dataclasses.replace(model_cfg, value_head=True)


def lm_config(model_cfg: ModelConfig) -> ModelConfig:
  return dataclasses.replace(model_cfg, value_head=False)


def last_index(segment_ids_BT):
  """Index of each row's last real (segment id != 0) token, for left or right padding."""
  t = segment_ids_BT.shape[1]
  real = segment_ids_BT != 0
  return (t - 1 - jnp.argmax(real[:, ::-1], axis=1)).astype(jnp.int32)


def scores_at_last(values_BT, segment_ids_BT):
  return jnp.take_along_axis(values_BT, last_index(segment_ids_BT)[:, None], axis=1)[:, 0]


def pair_tokens(batch):
  """The chosen rows then the rejected rows, [2B, T] each: one forward scores both."""
  cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
  return {k: cat(k) for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}


def completion_logprobs(model, params, tokens, *, chunk: int = head.DEFAULT_CHUNK,
                        temperature: float = 1.0, per_token=False, with_aux: bool = False):
  """log π(y|x): the sum (or mean, per_token=True) of log p(target) over loss_mask positions,
  f32[B] (completion tokens only, the final EOS included even when pad = EOS;
  padding and prompt contribute nothing, by `where`, so not even a non-finite value there
  could leak in). chunk: train.loss_chunk (model/head.py). with_aux: (log π, moe.MoEAux or
  None), the router statistics of the forward."""
  scores, aux = pretrain.score_targets(model, params, tokens, chunk=chunk,
                                       temperature=temperature, with_aux=True)
  logp = objectives.masked_sum(scores.logp, tokens["loss_mask"], axis=-1)
  if per_token:
    logp = logp / jnp.maximum(jnp.sum(tokens["loss_mask"], axis=1), 1.0)
  return (logp, aux) if with_aux else logp


def pair_batch_shapes(batch_size: int, seq_len: int) -> dict:
  out = {}
  for prefix in ("chosen", "rejected"):
    for k, v in pretrain.token_batch_shapes(batch_size, seq_len).items():
      out[f"{prefix}_{k}"] = v
    out[f"{prefix}_last"] = ((batch_size,), np.int32)
  out["margin"] = ((batch_size,), np.float32)
  out["valid"] = ((batch_size,), np.float32)
  return out


class ScoreEval:
  """Held-out score of greedy answers: the first rl.eval_samples prompts of `prompt_files`,
  answered greedily, scored by `scorer(prompt texts, prompt ids, completions)` (default:
  rl.reward_fn on the decoded texts). For the worked example (train/examples/arithmetic.py)
  the score is the accuracy."""

  def __init__(self, cfg, model_cfg: ModelConfig, formatter, prompt_files, to_model_params,
               scorer=None):
    rows = []
    for path in prompt_files:
      rows += [row for _, row in posttrain_data.read_rows(path, "prompts", cfg.data)]
    rows = rows[:cfg.rl.eval_samples]
    if not rows:
      raise ConfigError("rl.eval_prompts: no prompts to evaluate on")
    self.prompts = [formatter.prompt(r) for r in rows]
    self.texts = [posttrain_data.prompt_text(r) for r in rows]
    if scorer is None:
      fn = reward_function(cfg.rl.reward_fn)
      decode = functools.partial(formatter.tokenizer.decode, skip_special_tokens=True)
      scorer = lambda texts, ids, completions: [fn(p, decode(c))
                                                for p, c in zip(texts, completions)]
    self.cfg, self.model_cfg, self.formatter, self.scorer = cfg, model_cfg, formatter, scorer
    self.to_model_params = jax.jit(to_model_params)

  def __call__(self, params, frozen) -> dict:
    out = generate(self.model_cfg, self.to_model_params(params, frozen), self.prompts,
                   max_new_tokens=self.cfg.rl.max_new_tokens,
                   sampling=SamplingParams(temperature=0.0), eos_ids=self.formatter.eos_ids)
    return {"val_score": float(np.mean(self.scorer(self.texts, self.prompts, out)))}


def reward_function(spec: str):
  try:
    return import_function(spec)
  except ValueError as e:
    raise ConfigError(f"rl.reward_fn: {e}") from None


def eval_prompt_files(cfg) -> list:
  from train import data as data_lib
  if not cfg.rl.eval_prompts:
    return []
  return data_lib.match_files(cfg.rl.eval_prompts)

