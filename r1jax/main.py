"""r1jax command line: flags -> config -> stage runner.

  python -m r1jax.main --config=configs/pretrain.py:tiny --workdir=/tmp/base \
      [--config.train.num_steps=100 ...]
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from r1jax.config_files import load_config  # noqa: F401  (r1jax.main.load_config, for notebooks)
from r1jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/pretrain.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
# Multi-host without a managed cluster (TPU pods, SLURM and Open MPI jobs are
# detected): one process per host, each started with its id. The JAX_COORDINATOR_ADDRESS /
# JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables do the same.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def _stage_runner(name: str):
  # Imported lazily so `--help` and config errors do not pay for JAX start-up.
  if name == "pretrain":
    from r1jax.stages import pretrain
    return pretrain.run
  if name == "r1_zero":
    from r1jax.stages import r1_zero
    return r1_zero.run
  if name == "r1":
    from r1jax.stages import r1
    return r1.run
  if name == "distill":
    from r1jax.stages import distill
    return distill.run
  raise UserError(f"config.stage={name!r} is not a known stage (known: 'pretrain', 'r1_zero', "
                  "'r1', 'distill')")


def prepare_workdir(path: str) -> str:
  """Creates WORKDIR if needed; refuses a path that is a file."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--workdir={path} is a file, not a directory")
  os.makedirs(path, exist_ok=True)
  return path


def cli_main(runner: Callable[[Any, str], dict], *, save_config: bool = True):
  """An absl `main`: --config and --workdir -> `runner(config, workdir)` -> its
  results as one JSON line; bad input (a UserError) is one line and exit code 2.

  `save_config` writes the config to WORKDIR/config.json first (stages do; the
  evaluation CLI writes its own beside its outputs instead).
  """
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:  # before anything starts a JAX backend
      from r1jax.parallel import distributed
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except UserError as e:
      print(f"r1jax: error: {e}", file=sys.stderr)
      sys.exit(2)
    try:
      config = _CONFIG.value
      config.get("name")  # the first access loads the file
    except OSError as e:  # ml_collections defers config-file load errors to here
      print(f"r1jax: error: {' '.join(str(e).split())}", file=sys.stderr)
      sys.exit(2)
    try:
      workdir = prepare_workdir(_WORKDIR.value)
      main_process = distributed.is_main_process()  # files and stdout: process 0 only
      if save_config and main_process:
        with open(os.path.join(workdir, "config.json"), "w") as f:
          f.write(config.to_json_best_effort(indent=2))
      results = runner(config, workdir)
    except UserError as e:
      print(f"r1jax: error: {e}", file=sys.stderr, flush=True)
      # A failed orbax restore leaves tensorstore reads in flight whose callbacks
      # print "Event loop is closed" tracebacks as they land: the error is said.
      os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
      sys.exit(2)
    logging.info("results: %s", json.dumps(results, sort_keys=True))
    if main_process:
      print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)},
                     sort_keys=True))
  return main


main = cli_main(lambda config, workdir: _stage_runner(config.stage)(config, workdir))


def _config_key_hint(argv: list[str], flag: str) -> str:
  """For an unknown `--config.a.b=v`: the closest fields at the level where it goes wrong,
  or that level's fields when none is close."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  try:
    node = load_config(spec)
  except Exception:  # pylint: disable=broad-except  (the config error is reported elsewhere)
    return ""
  path = flag.split("=", 1)[0][len("--config."):].split(".")
  for i, part in enumerate(path):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part in keys:
      node = node[part]
      continue
    where = ".".join(path[:i])
    full = lambda k: f"{where}.{k}" if where else k
    close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
    if close:
      return f"; did you mean {' or '.join(full(k) for k in close)}?"
    return f"; {'config.' + where if where else 'config'} has {', '.join(sorted(keys))}"
  return ""


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config mistakes reported as one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # ml_collections raises Key/Attribute/Value/TypeErrors
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    detail = str(cause.args[0]) if isinstance(cause, KeyError) and cause.args else str(cause)
    culprit = next((a for a in argv[1:] if isinstance(cause, KeyError) and detail in a), None)
    if isinstance(cause, KeyError):
      detail = f"no config field {detail!r}"
      if culprit and culprit.startswith("--config."):
        detail += _config_key_hint(argv, culprit)
    else:
      detail = f"{type(cause).__name__}: {detail}"
    where = f" {culprit}" if culprit else ""
    print(f"r1jax: error: bad flag{where}: {detail} (see --helpfull)", file=sys.stderr)
    sys.exit(2)


def run(main_fn=None):
  """Runs `main_fn` (default: the stage runner's main) as an absl app."""
  app.run(main_fn or main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
