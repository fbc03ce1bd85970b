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


def rope_sin_cos(positions_BT: jax.Array, inv_freq) -> tuple[jax.Array, jax.Array]:
  """sin and cos of positions x inv_freq, each [B, T, h] float32.

  On CPU both are computed in a conditional whose two branches are the same
  function, so they become buffers that q's and k's rotations read. Left
  alone, XLA:CPU fuses sin and cos into each consumer and evaluates them per
  element of q and k: (N + K) x 2 times over, per layer (it also drops
  `optimization_barrier` before fusion). A bench decode step's q and k
  rotations: 278 -> 40 us per layer, the same floats (tests/test_model.py).
  """
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  sin_cos = lambda a: (jnp.sin(a), jnp.cos(a))
  if jax.default_backend() != "cpu" or positions_BT.size == 0:
    return sin_cos(angles_BTh)
  # Any predicate XLA cannot fold will do: both branches compute the same.
  return jax.lax.cond(positions_BT.reshape(-1)[0] >= 0, sin_cos, sin_cos, angles_BTh)


def rotate_half(x_BTNH: jax.Array, sin_BTh: jax.Array, cos_BTh: jax.Array) -> jax.Array:
  """[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] per head (Hugging Face
  "rotate_half" layout), in float32."""
  sin, cos = sin_BTh[:, :, None, :], cos_BTh[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def _projection_out_dims(equation: str) -> Optional[int]:
  """For "BT<in>,<in><out>->BT<out>" (a projection of every token), the number
  of output dims; None for any other einsum."""
  inputs, out = equation.split("->")
  x, kernel = inputs.split(",")
  if not (x[:2] == out[:2] == "BT" and kernel == x[2:] + out[2:]):
    return None
  return len(out) - 2


@jax.custom_vjp
def cpu_linear(x_XI: jax.Array, w_IO: jax.Array) -> jax.Array:
  """x @ w whose weight gradient multiplies an explicitly transposed x.

  Left to itself, XLA:CPU computes the weight gradient x^T g with g transposed
  inside the fusion that produces it (the SwiGLU backward: a [BT, F] array
  written column by column, ~0.9 s per layer on the bench config). The
  barrier makes x^T (the narrower operand) a transpose of its own and g a
  plain row-major operand. Bench GRPO update (benchmarks/grpo_step.py): 12.2
  -> 7.5 s. Only used on CPU, where the layout is the problem.
  """
  return x_XI @ w_IO


def _cpu_linear_fwd(x_XI, w_IO):
  return x_XI @ w_IO, (x_XI, w_IO)


def _cpu_linear_bwd(residuals, g_XO):
  x_XI, w_IO = residuals
  x_IX = jax.lax.optimization_barrier(x_XI.T)
  return g_XO @ w_IO.T, x_IX @ g_XO


cpu_linear.defvjp(_cpu_linear_fwd, _cpu_linear_bwd)


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
    x, kernel = x.astype(c.dtype), kernel.astype(c.dtype)
    out_dims = _projection_out_dims(self.equation)
    if out_dims is not None and jax.default_backend() == "cpu":
      # As the einsum, with the weight gradient's transpose taken apart (see
      # `cpu_linear`): the projections' backward on CPU ran 1.6x faster.
      out_shape = self.shape[len(self.shape) - out_dims:]
      x_XI = x.reshape(math.prod(x.shape[:2]), -1)
      y = cpu_linear(x_XI, kernel.reshape(x_XI.shape[1], -1)).reshape(*x.shape[:2], *out_shape)
    else:
      y = jnp.einsum(self.equation, x, kernel)
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
