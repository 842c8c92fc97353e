"""train/harness.py: lm-eval's `jaxllm` model on a tiny run directory, against plain forwards.

Each request type is checked against a full forward per row in numpy (log-softmax, argmax,
a greedy loop that reruns the whole prefix); then two local tasks (multiple choice and
generation, JSONL files in tmp_path) run through lm_eval.simple_evaluate and lm-eval's own
`lm_eval` command, offline, and their scores are recomputed here from those reference numbers.
The command and a fresh interpreter's lookups find `jaxllm` through the installed .pth
(train/lm_eval_plugin.py)."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra (also in `test`)

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from model import ModelConfig, Transformer  # noqa: E402
from train import harness  # noqa: E402

EOS = "<|endoftext|>"
TEXTS = ["def add(a, b):\n    return a + b\n", "the cat sat on the mat", "hello world " * 3,
         "a dog ran in the park and the cat sat"]
MAX_LEN = 24  # small, so that long requests get cut


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(run directory, cfg, params, tokenizer): a random tiny Llama written as training writes
  a run (config.json, tokenizer.json, checkpoints/0/params)."""
  import orbax.checkpoint as ocp
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
      vocab_size=80, special_tokens=[EOS, "<unk>"], show_progress=False))
  cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=MAX_LEN, init_std=0.3)
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(jax.jit(lambda k: Transformer(cfg).init(k, tokens, tokens)["params"])(
      jax.random.PRNGKey(0)))
  path = tmp_path_factory.mktemp("run")
  tok.save(str(path / "tokenizer.json"))
  fields = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
  (path / "config.json").write_text(json.dumps({"model": fields}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(path / "checkpoints" / "0" / "params"), params)
  return str(path), cfg, params, tok


def _logits(cfg, params, ids) -> np.ndarray:
  """f32[T, V]: one row through the module, alone. Right-padded to MAX_LEN for one compile:
  causal attention keeps the padding out of the real positions' logits."""
  padded = np.zeros((1, MAX_LEN), np.int32)
  padded[0, :len(ids)] = ids
  return np.asarray(_forward(cfg, params, padded)[0, :len(ids)], np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids):
  return Transformer(cfg).apply({"params": params}, ids, jnp.arange(ids.shape[1])[None])[0]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_loglikelihood(run, context, continuation):
  """(log p, greedy) the way lm-eval's HF model scores a pair: BOS + the whole text encoded
  once, the continuation the tokens after the context's; at most MAX_LEN + 1 tokens, cut from
  the left; each continuation token scored after all the (kept) tokens before it."""
  _, cfg, params, tok = run
  eos = tok.token_to_id(EOS)
  if context:
    whole = [eos] + tok.encode(context + continuation).ids
    n_cont = len(whole) - len([eos] + tok.encode(context).ids)
  else:
    whole = [eos] + tok.encode(continuation, add_special_tokens=False).ids
    n_cont = len(whole) - 1
  row = whole[-(MAX_LEN + 1):]
  logp = _log_softmax(_logits(cfg, params, row[:-1]))
  targets = np.asarray(row[1:])
  scored = np.arange(len(targets) - n_cont, len(targets))
  return (float(logp[scored, targets[scored]].sum()),
          bool(np.all(logp[scored].argmax(-1) == targets[scored])))


PAIRS = [("the cat", " sat on the mat"), ("def add(a, b):", "\n    return a + b"),
         ("", "hello world"), ("hello world", " hello"),
         ("the cat sat on the mat " * 6 + "and", " the dog")]  # the last is cut to MAX_LEN + 1


def _instances(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def test_loglikelihood_matches_a_plain_forward(run):
  path, _, _, tok = run
  assert len(tok.encode("".join(PAIRS[-1])).ids) > MAX_LEN + 4  # so the reference cuts it
  # max_batch_tokens=32 with auto: rows of 8 and 16 tokens land in several batches.
  lm = harness.JaxLM(checkpoint=path, batch_size="auto", max_batch_tokens=32)
  got = lm.loglikelihood(_instances("loglikelihood", PAIRS), disable_tqdm=True)
  want = [_reference_loglikelihood(run, c, x) for c, x in PAIRS]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4, atol=1e-4)
  assert [g[1] for g in got] == [w[1] for w in want]
  # In tokens: a continuation of the argmax tokens is greedy; one token off, it is not.
  _, cfg, params, _ = run
  context = [tok.token_to_id(EOS)] + tok.encode("the cat").ids
  greedy = []
  for _ in range(3):
    greedy.append(int(_logits(cfg, params, context + greedy)[-1].argmax()))
  other = greedy[:2] + [(greedy[2] + 1) % cfg.vocab_size]
  got = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])
  assert [g[1] for g in got] == [True, False]


def test_loglikelihood_rolling_sums_every_token_once(run):
  path, cfg, params, tok = run
  text = " ".join(TEXTS * 2) + " the end"
  ids = tok.encode(text, add_special_tokens=False).ids
  assert len(ids) > 2 * MAX_LEN and len(ids) % MAX_LEN  # three windows, the last partial
  # Each window of MAX_LEN tokens is predicted after the token before it (EOS before the
  # first); the last, shorter one after as many tokens as fit.
  padded = [tok.token_to_id(EOS)] + ids
  want = 0.0
  for start in range(0, len(ids), MAX_LEN):
    end = min(start + MAX_LEN, len(ids))
    row = padded[max(end - MAX_LEN, 0):end + 1]
    logp = _log_softmax(_logits(cfg, params, row[:-1]))
    for j in range(len(row) - 1 - (end - start), len(row) - 1):
      want += logp[j, row[j + 1]]
  lm = harness.JaxLM(checkpoint=path, batch_size=2)
  got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,), ("the cat",)]),
                                 disable_tqdm=True)
  assert got[0] == pytest.approx(want, rel=1e-5)
  short = [tok.token_to_id(EOS)] + tok.encode("the cat").ids
  logp = _log_softmax(_logits(cfg, params, short[:-1]))
  assert got[1] == pytest.approx(sum(logp[j, short[j + 1]] for j in range(len(short) - 1)),
                                 rel=1e-5)


def _greedy_text(run, prompt_ids, n):
  """Greedy decoding by a plain loop: the whole prefix through the module for each token."""
  _, cfg, params, tok = run
  ids = list(prompt_ids)
  for _ in range(n):
    ids.append(int(_logits(cfg, params, ids)[-1].argmax()))
    if ids[-1] == tok.token_to_id(EOS):
      break
  return tok.decode(ids[len(prompt_ids):], skip_special_tokens=True)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(run):
  path, _, _, tok = run
  eos = tok.token_to_id(EOS)
  prompts = ["the cat", "def add(a, b):", "hello"]
  full = [_greedy_text(run, [eos] + tok.encode(p).ids, 8) for p in prompts]
  stop = next(t[2:4] for t in full if len(t) >= 4)  # a string the first long output holds
  args = [(p, {"until": [stop], "max_gen_toks": 8, "do_sample": False}) for p in prompts]
  args.append((prompts[0], {"max_gen_toks": 3}))  # another group: no stop string, 3 tokens
  lm = harness.JaxLM(checkpoint=path, batch_size=2)
  got = lm.generate_until(_instances("generate_until", args), disable_tqdm=True)
  assert got[:3] == [t.split(stop)[0] for t in full]
  assert got[3] == _greedy_text(run, [eos] + tok.encode(prompts[0]).ids, 3)


def test_a_quantized_run_scores_with_its_dequantized_weights(run, tmp_path):
  from infer import workdir as run_dir
  from model import quant
  from train.convert import Quantize, convert
  path, cfg, _, _ = run
  dst = convert(f"orbax:{path}", f"orbax:{tmp_path / 'int4'}",
                quantize=Quantize(quant.Spec("int4", group=32)))
  dense = run_dir.load_params(dst, cfg, dense=True)  # the int4 codes, dequantized
  lm = harness.JaxLM(checkpoint=dst, batch_size=4)
  got = lm.loglikelihood(_instances("loglikelihood", PAIRS[:3]), disable_tqdm=True)
  want = [_reference_loglikelihood(run[:2] + (dense,) + run[3:], c, x) for c, x in PAIRS[:3]]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4, atol=1e-4)
  assert [g[1] for g in got] == [w[1] for w in want]
  original = [_reference_loglikelihood(run, c, x)[0] for c, x in PAIRS[:3]]
  assert np.abs(np.subtract([g[0] for g in got], original)).max() > 1e-3  # int4 was used


def test_bad_model_args_are_clear_errors(run):
  path = run[0]
  with pytest.raises(ValueError, match="exactly one model"):
    harness.JaxLM(checkpoint=path, gguf="x.gguf")
  with pytest.raises(ValueError, match="max_length=99"):
    harness.JaxLM(checkpoint=path, max_length=99)
  with pytest.raises(ValueError, match="--batch_size='big'"):
    harness.JaxLM(checkpoint=path, batch_size="big")
  with pytest.raises(ValueError, match=r"unknown \['pretrained'\]; jaxllm takes \['checkpoint'"):
    harness.JaxLM(checkpoint=path, pretrained="gpt2")


MC = [{"question": "the cat sat on the", "choices": ["mat", "dog", "park"], "answer": 0},
      {"question": "def add(a, b):", "choices": ["return", "hello"], "answer": 1},
      {"question": "a dog ran in the", "choices": ["park", "cat", "mat"], "answer": 0},
      {"question": "hello", "choices": ["world", "cat"], "answer": 0}]
GEN = [{"prompt": "the cat", "target": "sat"}, {"prompt": "hello", "target": "world"},
       {"prompt": "def add(a, b):", "target": "return"}]


def _tasks(tmp_path, gen_target):
  """Two task YAMLs over local JSONL files: `tiny_mc` (multiple choice, acc) and `tiny_gen`
  (generate_until, exact_match); `gen_target` replaces GEN's targets."""
  rows = {"mc": MC, "gen": [dict(g, target=t) for g, t in zip(GEN, gen_target)]}
  for name, docs in rows.items():
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  common = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                         f"    test: {tmp_path / name}.jsonl\ntest_split: test\n")
  (tmp_path / "tiny_mc.yaml").write_text(
      "task: tiny_mc\n" + common("mc") + "output_type: multiple_choice\n"
      "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
      "metric_list:\n  - metric: acc\n")
  (tmp_path / "tiny_gen.yaml").write_text(
      "task: tiny_gen\n" + common("gen") + "output_type: generate_until\n"
      "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
      "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 5\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n")
  return str(tmp_path)


def _expected(run):
  """(tiny_mc's accuracy, tiny_gen's greedy outputs) from the reference computations."""
  right = [int(np.argmax([_reference_loglikelihood(run, d["question"], " " + c)[0]
                          for c in d["choices"]]) == d["answer"]) for d in MC]
  eos = run[3].token_to_id(EOS)
  outs = [_greedy_text(run, [eos] + run[3].encode(g["prompt"]).ids, 5) for g in GEN]
  return float(np.mean(right)), [o.split("\n")[0].split(".")[0] for o in outs]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_local_tasks_through_simple_evaluate(run, tmp_path):
  acc, outs = _expected(run)
  # One generation target is not the model's output: exact_match is then 2/3.
  include = _tasks(tmp_path, [outs[0], outs[1] + "x", outs[2]])
  results = lm_eval.simple_evaluate(
      model="jaxllm", model_args=f"checkpoint={run[0]},max_batch_tokens=64", batch_size="auto",
      tasks=["tiny_mc", "tiny_gen"],
      task_manager=TaskManager(include_path=include, include_defaults=False))["results"]
  assert results["tiny_mc"]["acc,none"] == pytest.approx(acc)
  assert results["tiny_gen"]["exact_match,none"] == pytest.approx(2 / 3)


def _subprocess_env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


# In a fresh interpreter (not this one, which imported train.harness): what startup imported,
# then lm-eval's lookups with nothing of ours imported first.
FRESH_LOOKUPS = """
import json, sys
startup = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "lm_eval", "torch"})
finders = [type(f).__module__ + "." + type(f).__name__ for f in sys.meta_path]
from lm_eval.api.registry import get_model, model_registry
dummy, hf = get_model("dummy"), get_model("hf")
harness_imported = "train.harness" in sys.modules
jaxllm = get_model("jaxllm")
import lm_eval.models
print(json.dumps({"startup": startup, "finders": finders, "harness_imported": harness_imported,
                  "names": sorted(model_registry), "dummy": dummy.__module__ + ":" + dummy.__name__,
                  "hf": hf.__module__ + ":" + hf.__name__,
                  "jaxllm": jaxllm.__module__ + ":" + jaxllm.__name__,
                  "loader": type(lm_eval.models.__loader__).__name__,
                  "finders_after": [type(f).__name__ for f in sys.meta_path]}))
"""
NOT_INSTALLED = ("is jaxllm-lm-eval.pth in site-packages? Reinstall the package (`pip install "
                 "--no-deps -e .`, setup.py writes it)")


def test_lm_eval_finds_jaxllm_beside_its_own_models(tmp_path):
  """train/lm_eval_plugin.py through the installed .pth: startup imports neither lm_eval nor
  jax; get_model still fills the registry with lm-eval's own models (a placeholder of ours
  in an empty registry would stop that) and adds `jaxllm`, loaded only when asked for."""
  from lm_eval.models import MODEL_MAPPING
  res = subprocess.run([sys.executable, "-c", FRESH_LOOKUPS], cwd=tmp_path, capture_output=True,
                       text=True, env=_subprocess_env(), timeout=300)
  assert res.returncode == 0, f"{NOT_INSTALLED}\n{res.stderr[-3000:]}"
  got = json.loads(res.stdout.splitlines()[-1])
  assert got["startup"] == []
  assert "train.lm_eval_plugin.LmEvalModelsFinder" in got["finders"], NOT_INSTALLED
  assert got["names"] == sorted({*MODEL_MAPPING, harness.NAME})
  assert got["dummy"] == MODEL_MAPPING["dummy"] and got["hf"] == MODEL_MAPPING["hf"]
  assert not got["harness_imported"]
  assert got["jaxllm"] == f"train.harness:{harness.JaxLM.__name__}"
  assert got["loader"] == "SourceFileLoader"  # lm_eval.models keeps its own loader
  assert "LmEvalModelsFinder" not in got["finders_after"]  # and the hook is gone
  # Here train.harness came first: the class itself, and lm-eval's models beside it.
  assert lm_eval.api.registry.get_model("jaxllm") is harness.JaxLM
  assert lm_eval.api.registry.get_model("dummy").__name__ == "DummyLM"


def test_the_command_line(run, tmp_path):
  """lm-eval's own command line (`python -m lm_eval`: the function the `lm_eval` command
  runs), outside the repository: only the installed package (and its .pth) can bring
  `jaxllm`."""
  acc, outs = _expected(run)
  include, out = _tasks(tmp_path, outs), tmp_path / "out"
  res = subprocess.run(
      [sys.executable, "-m", "lm_eval", "--model", "jaxllm", "--model_args",
       f"checkpoint={run[0]}", "--tasks", "tiny_mc", "--include_path", include,
       "--batch_size", "4", "--output_path", str(out)],
      cwd=tmp_path, capture_output=True, text=True, env=_subprocess_env(), timeout=600)
  assert res.returncode == 0, f"{NOT_INSTALLED}\n{res.stderr[-3000:]}"
  (saved,) = list(out.rglob("results_*.json"))
  assert json.loads(saved.read_text())["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
