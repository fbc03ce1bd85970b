"""Shared pytest setup: `--runslow` enables the full-size end-to-end runs."""

import os
import tempfile

import jax
import pytest

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


# Tests rebuild the same tiny programs many times (each run makes new jitted
# closures, and the end-to-end tests start `python -m r1jax.main` processes
# that compile the same smoke models again); a persistent cache shared by the
# session's xdist workers and every subprocess they start (through the
# environment) compiles each program once.
def _cache_dir() -> str:
  if "R1JAX_TEST_JAX_CACHE" in os.environ:
    return os.environ["R1JAX_TEST_JAX_CACHE"]
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run
  if run:
    path = os.path.join(tempfile.gettempdir(), f"r1jax-jax-cache-{run}")
    os.makedirs(path, exist_ok=True)
    return path
  return tempfile.mkdtemp(prefix="r1jax-jax-cache-")


os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
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
