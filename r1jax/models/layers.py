"""Building blocks of the dense decoder: RMSNorm, rotary embeddings, SwiGLU."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.models.config import ModelConfig


def param_init(config: ModelConfig, *axes: str):
  """Normal(0, initializer_range) init annotated with logical axis names."""
  return nn.with_logical_partitioning(
      nn.initializers.normal(config.initializer_range), axes)


class RMSNorm(nn.Module):
  """Root-mean-square norm computed in float32 (as in Llama/Qwen2)."""

  eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2], with Llama-3.1 rescaling when configured."""
  head = config.head_size
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, head, 2, dtype=jnp.float32) / head))
  if config.rope_scaling_type != "llama3":
    return inv_freq
  # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and
  # the band between is interpolated smoothly.
  factor = config.rope_scaling_factor
  old_len = config.rope_original_max_position_embeddings
  low_wavelen = old_len / config.rope_low_freq_factor
  high_wavelen = old_len / config.rope_high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  smooth = (old_len / wavelen - config.rope_low_freq_factor) / (
      config.rope_high_freq_factor - config.rope_low_freq_factor)
  smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  out = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return jnp.where(is_mid, smoothed, out)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates halves (Hugging Face "rotate_half" layout), in float32."""
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    c = self.config
    dense = lambda f, axes, name: nn.DenseGeneral(
        f, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
        kernel_init=param_init(c, *axes), name=name)
    gate_BTF = dense(c.intermediate_size, ("embed", "mlp"), "gate_proj")(x_BTD)
    up_BTF = dense(c.intermediate_size, ("embed", "mlp"), "up_proj")(x_BTD)
    h_BTF = nn.with_logical_constraint(
        nn.silu(gate_BTF) * up_BTF, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(c.hidden_size, ("mlp", "embed"), "down_proj")(h_BTF)
