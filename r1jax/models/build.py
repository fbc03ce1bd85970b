"""Model configs and modules from experiment configs, for either model family.

`config.model` holds the fields of a ModelConfig (dense Llama/Qwen2) or of a
DeepseekV3Config; the latter carries `model_type: "deepseek_v3"`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

import flax.linen as nn

from r1jax.models import config as dense_config
from r1jax.models import deepseek_v3
from r1jax.models.config import ModelConfig
from r1jax.models.deepseek_v3 import DeepseekV3, DeepseekV3Config
from r1jax.models.transformer import Transformer

AnyConfig = Union[ModelConfig, DeepseekV3Config]


def model_config(fields: Mapping[str, Any]) -> AnyConfig:
  """The frozen config dataclass of `config.model` (a dict or ConfigDict)."""
  fields = dict(fields)
  if fields.get("model_type") == "deepseek_v3":
    return DeepseekV3Config(**fields)
  return ModelConfig(**fields)


def build_model(fields: Union[Mapping[str, Any], AnyConfig]) -> nn.Module:
  """Transformer or DeepseekV3 for `config.model` (or a config dataclass)."""
  config = fields if dataclasses.is_dataclass(fields) else model_config(fields)
  if isinstance(config, DeepseekV3Config):
    return DeepseekV3(config)
  return Transformer(config)


def get_preset(name: str, **overrides) -> AnyConfig:
  """A named preset of either family (dense r1jax.models.config.PRESETS or
  r1jax.models.deepseek_v3.PRESETS)."""
  if name in deepseek_v3.PRESETS:
    return deepseek_v3.get_preset(name, **overrides)
  if name in dense_config.PRESETS:
    return dense_config.get_preset(name, **overrides)
  known = sorted(dense_config.PRESETS) + sorted(deepseek_v3.PRESETS)
  raise KeyError(f"unknown model preset {name!r}; known: {known}")
