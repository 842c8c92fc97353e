"""One decoder for the Llama, Mistral, Qwen, Gemma and mixture-of-experts families.

Dimension letters, used in einsums, shape comments and names (`x_BTD`):
  B batch          T query length      S key length      D model width
  N query heads    K kv heads          G group (N // K)  H head dim
  F ffn width      V vocab             L layers          P page size
"""

from model.config import ModelConfig
from model.head import TokenScores, token_scores
from model.kv_cache import KVCache
from model.transformer import Transformer, forward

__all__ = ["ModelConfig", "KVCache", "TokenScores", "Transformer", "forward", "token_scores"]
