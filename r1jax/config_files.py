"""Loading experiment config files (`configs/*.py`) by path: the CLI, the
notebooks and configs that build on a sibling config share this. It imports
nothing of the CLI, so a config file may use it."""

from __future__ import annotations

import importlib.util
import os

from r1jax.errors import UserError


def load_config(spec: str):
  """`path/to/config.py[:arg]` -> its get_config(arg), for notebooks and scripts."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(
      f"r1jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def sibling_config(config_file: str, name: str, arg: str):
  """`name`.py's get_config(arg) from the directory of `config_file` (a config's __file__)."""
  return load_config(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py:{arg}"))
