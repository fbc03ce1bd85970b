"""Building blocks of the dense decoder: RMSNorm, rotary embeddings, SwiGLU."""

from __future__ import annotations

import math
from typing import Optional

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


class Einsum(nn.Module):
  """A linear map written as an einsum against a kernel with logical axes.

  Used instead of DenseGeneral, whose flat-kernel init breaks logical
  constraints on multi-dimensional kernels under a mesh.
  """

  equation: str  # e.g. "BTD,DNH->BTNH"
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  config: ModelConfig
  bias_shape: Optional[tuple[int, ...]] = None  # output feature dims, if biased
  bias_axes: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kernel = self.param("kernel", param_init(c, *self.axes), self.shape, c.param_dtype)
    y = jnp.einsum(self.equation, x.astype(c.dtype), kernel.astype(c.dtype))
    if self.bias_shape is not None:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
          self.bias_shape, c.param_dtype)
      y = y + bias.astype(c.dtype)
    return y


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    c = self.config
    D, F = c.hidden_size, c.intermediate_size
    gate_BTF = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), c, name="gate_proj")(x_BTD)
    up_BTF = Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), c, name="up_proj")(x_BTD)
    h_BTF = nn.with_logical_constraint(
        nn.silu(gate_BTF) * up_BTF, ("activation_batch", "activation_length", "activation_mlp"))
    return Einsum("BTF,FD->BTD", (F, D), ("mlp", "embed"), c, name="down_proj")(h_BTF)
