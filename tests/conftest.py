"""Shared pytest setup: `--runslow` enables the full-size end-to-end runs."""

import os
import tempfile

import jax
import pytest

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


# Tests rebuild the same tiny programs many times (each run makes new jitted
# closures); a session-wide persistent cache compiles each one once.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("R1JAX_TEST_JAX_CACHE", tempfile.mkdtemp(prefix="r1jax-jax-cache-")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="full-size run: pass --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
