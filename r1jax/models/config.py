"""Dense decoder configuration and the named presets (Llama / Qwen2 family).

Field names follow Hugging Face `config.json` so checkpoints convert by name.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama/Qwen2-style dense decoder."""

  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_hidden_layers: int
  num_attention_heads: int  # N
  num_key_value_heads: int  # K (grouped-query attention when K < N)
  head_dim: Optional[int] = None  # H; None means hidden_size // num_attention_heads
  max_position_embeddings: int = 4096
  rope_theta: float = 10000.0
  # Llama-3.1 style frequency rescaling ("llama3"); None disables it.
  rope_scaling_type: Optional[str] = None
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2 has biases on q/k/v (not on o)
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  dtype: str = "float32"  # activation / matmul dtype
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each block in the backward pass
  # Training-path attention (no KV cache): "xla" (the segment mask, so packed
  # rows are exact; on CPU attention.causal_halves_attention) or "cudnn"
  # (cuDNN's fused flash attention, NVIDIA GPUs, bf16/fp16). "cudnn" is plain
  # causal attention without the mask: exact on the positions of rows that hold
  # one right-padded sequence each (GRPO update batches), not on packed rows,
  # so SFT, which packs, refuses it. Not a Hugging Face field.
  attention_impl: str = "xla"

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}; set head_dim")
    if self.attention_impl not in ("xla", "cudnn"):
      raise ValueError(f"attention_impl must be 'xla' or 'cudnn', got {self.attention_impl!r}")
    if self.rope_scaling_type not in (None, "llama3"):
      raise ValueError(f"unknown rope_scaling_type={self.rope_scaling_type!r}")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


_QWEN2_5_VOCAB = 152064
_LLAMA3_VOCAB = 128256
_LLAMA3_ROPE = dict(
    rope_theta=500000.0, rope_scaling_type="llama3", rope_scaling_factor=8.0,
    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
    rope_original_max_position_embeddings=8192, rms_norm_eps=1e-5,
    max_position_embeddings=131072)

PRESETS: dict[str, ModelConfig] = {
    # The tiny world's base model: trains on 2 CPU cores in minutes. The
    # vocabulary is the tiny world's sentencepiece model (r1jax.data.tokenizer).
    "tiny": ModelConfig(
        vocab_size=640, hidden_size=128, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True),
    # The tiny world's distillation student: half the layers of "tiny", same
    # tokenizer (token-level KD needs the teacher's vocabulary).
    "tiny-student": ModelConfig(
        vocab_size=640, hidden_size=128, intermediate_size=384,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True),
    # The distilled students of the R1 paper (shapes from their config.json).
    "qwen2.5-math-1.5b": ModelConfig(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        max_position_embeddings=4096, rope_theta=10000.0, qkv_bias=True,
        tie_word_embeddings=True),
    "qwen2.5-math-7b": ModelConfig(
        vocab_size=_QWEN2_5_VOCAB, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=4096, rope_theta=10000.0, qkv_bias=True),
    "qwen2.5-14b": ModelConfig(
        vocab_size=_QWEN2_5_VOCAB, hidden_size=5120, intermediate_size=13824,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
        max_position_embeddings=131072, rope_theta=1000000.0, qkv_bias=True,
        rms_norm_eps=1e-5),
    "qwen2.5-32b": ModelConfig(
        vocab_size=_QWEN2_5_VOCAB, hidden_size=5120, intermediate_size=27648,
        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
        max_position_embeddings=131072, rope_theta=1000000.0, qkv_bias=True,
        rms_norm_eps=1e-5),
    "llama3.1-8b": ModelConfig(
        vocab_size=_LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        **_LLAMA3_ROPE),
    "llama3.3-70b": ModelConfig(
        vocab_size=_LLAMA3_VOCAB, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        **_LLAMA3_ROPE),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """Returns the named preset with `overrides` applied."""
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
