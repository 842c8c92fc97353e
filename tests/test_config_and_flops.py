"""Config overrides and the analytic FLOP count."""

import pytest

from model import ModelConfig
from train.config import ConfigError, load_config, split_overrides
from train.metrics import matmul_params, training_flops_per_token


def test_overrides_keep_types():
  overrides, rest = split_overrides(["--config.train.steps=7", "--dry_run",
                                     "--config.train.lr", "0.5", "--config.model.dtype=bfloat16",
                                     "--config.model.tie_embeddings=false"])
  assert rest == ["--dry_run"]
  cfg = load_config("configs/tiny.py", overrides)
  assert cfg.train.steps == 7 and cfg.train.lr == 0.5
  assert cfg.model.dtype == "bfloat16" and cfg.model.tie_embeddings is False


@pytest.mark.parametrize("key,near", [("train.stesp", "steps"), ("modle.d_model", "model")])
def test_unknown_key_names_the_valid_ones(key, near):
  with pytest.raises(ConfigError) as e:
    load_config("configs/tiny.py", {key: "1"})
  assert f"config.{key}" in str(e.value) and near in str(e.value)
  assert "Valid keys in config" in str(e.value)


def test_config_file_with_an_argument():
  """configs/ladder.py:RUNG calls get_config(RUNG), as ml_collections.config_flags does."""
  cfg = load_config("configs/ladder.py:dpo", {"train.steps": "3"})
  assert cfg.task == "dpo" and cfg.workdir == "runs/arith_dpo" and cfg.dpo.beta == 0.1
  assert cfg.train.steps == 3 and cfg.train.init_from == "runs/arith_sft"
  smol = load_config("configs/ladder.py:smollm2_sft", {})
  assert smol.workdir == "runs/smollm2_sft" and smol.train.init_from == "runs/smollm2"


@pytest.mark.parametrize("path,message", [
    ("configs/ladder.py", "needs an argument: --config=configs/ladder.py:ARG"),
    ("configs/ladder.py:sfft", "no rung 'sfft'; rungs: sft, reward"),
    ("configs/tiny.py:sft", "takes no argument"),
    ("configs/nope.py:sft", "'configs/nope.py' does not exist"),
])
def test_config_argument_errors(path, message):
  with pytest.raises(ConfigError, match=message):
    load_config(path, {})


def test_bad_value_names_the_key():
  with pytest.raises(ConfigError, match="config.train.steps"):
    load_config("configs/tiny.py", {"train.steps": "many"})


def test_flop_count_by_hand():
  cfg = ModelConfig(vocab_size=10, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=2,
                    d_ff=8)
  # per layer: q 4*2*2 + k 4*1*2 + v 4*1*2 + o 2*2*4 + mlp 3*4*8 = 16+8+8+16+96 = 144
  assert matmul_params(cfg) == 2 * 144 + 4 * 10
  # forward per token at T = 3: 2 * 328 matmul FLOPs + attention 4 * L * N * H * (3+1)/2 = 64
  assert training_flops_per_token(cfg, 3) == 3 * (2 * 328 + 64)
  assert training_flops_per_token(cfg, 3, causal=False) == 3 * (2 * 328 + 4 * 2 * 2 * 2 * 3)


def test_flop_count_of_llama3_8b_matches_the_usual_6n():
  cfg = ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    head_dim=128, d_ff=14336, tie_embeddings=False)
  n_matmul = matmul_params(cfg)
  assert abs(n_matmul - 7.5e9) / 7.5e9 < 0.01  # 8.03B params less the 0.53B input embedding
  assert training_flops_per_token(cfg, 8192) == pytest.approx(
      6 * n_matmul + 6 * 32 * 32 * 128 * 8193, rel=1e-9)


@pytest.mark.parametrize("key,value,named", [("model.dtype", "float64", "model.dtype"),
                                             ("model.n_kv_heads", "3", "model.n_kv_heads"),
                                             ("mesh.data", "3", "mesh.data"),
                                             ("mesh.expert", "3", "mesh.expert"),
                                             ("train.decay", "step", "train.decay"),
                                             ("train.optimizer", "sgd", "train.optimizer"),
                                             ("train.optimizer_block", "0",
                                              "train.optimizer_block")])
def test_invalid_values_are_config_errors_naming_the_key(key, value, named):
  from train.loop import model_and_mesh
  cfg = load_config("configs/tiny.py", {key: value})
  with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
    model_and_mesh(cfg)


def test_expert_mesh_errors_name_the_keys():
  from train.loop import model_and_mesh
  cfg = load_config("configs/tiny_moe.py", {"mesh.expert": "-1"})  # and mesh.data = -1
  with pytest.raises(ConfigError, match=r"only one of .*mesh\.expert"):
    model_and_mesh(cfg)
  cfg = load_config("configs/tiny_moe.py", {"mesh.expert": "4", "mesh.data": "2",
                                            "model.n_experts": "6"})
  with pytest.raises(ConfigError, match=r"model\.n_experts=6 .*mesh\.expert=4"):
    model_and_mesh(cfg)
  cfg = load_config("configs/tiny_moe.py", {"mesh.expert": "4", "mesh.data": "2",
                                            "train.batch_size": "4"})
  with pytest.raises(ConfigError, match=r"mesh\.data x mesh\.fsdp x mesh\.expert = 8"):
    model_and_mesh(cfg)
