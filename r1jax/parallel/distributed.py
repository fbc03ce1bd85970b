"""Multi-host runs through JAX's own distributed runtime (`jax.distributed`).

One process per host (a TPU VM of a pod slice, a GPU node, or several CPU
processes on one machine in the tests). Every process runs the same program
on the same global arrays; what differs per process is which devices it feeds
and which host-side work it does:

- start-up: `initialize()` joins the processes before any other JAX call; a
  no-op for a single process.
- input: `shard_batch` puts only this process's rows of a batch on its own
  devices (`jax.make_array_from_process_local_data`); `process_rows` says which
  rows those are, so a loader can read just them.
- output: `fetch` brings global arrays (sampler output) back to every host.
- rewards: `score_on_hosts` scores this process's share of the completions and
  all-gathers the rewards, so every host ends with all of them.
- files and logs: process 0 only (`is_main_process`); checkpoints are written
  and read by all processes together (orbax coordinates them).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from r1jax.errors import ConfigError

# How a launcher that is not a managed cluster tells each process its place.
# JAX itself reads the first; we read the other two.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _managed_multihost(environ: Mapping[str, str]) -> str | None:
  """The cluster kind when the environment is a multi-host job JAX sets up itself."""
  for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    hosts = [h for h in environ.get(var, "").split(",") if h]
    if len(hosts) > 1:
      return "tpu"
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"  # multi-slice
  if (_env_int(environ, "SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in environ:
    return "slurm"
  if (_env_int(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "ompi"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               environ: Mapping[str, str] | None = None) -> bool:
  """Joins a multi-process run when the flags or the environment say so.

  Explicit arguments win over JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID; with none of them, a multi-host TPU slice (or a SLURM /
  Open MPI job) is detected and JAX fills in the rest itself. Must run before
  anything touches a JAX backend. Returns whether jax.distributed is active.
  Raises ConfigError for a half-specified setup.
  """
  environ = os.environ if environ is None else environ
  if jax.distributed.is_initialized():
    return True
  address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  num = num_processes if num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
  if address is not None or (num or 1) > 1 or pid is not None:
    missing = [n for n, v in (("coordinator address", address), ("number of processes", num),
                              ("process id", pid)) if v is None]
    if missing:
      raise ConfigError(
          f"a multi-process run needs a coordinator address, a number of processes and a "
          f"process id (flags --coordinator_address/--num_processes/--process_id or "
          f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); missing: "
          f"{', '.join(missing)}")
    if not 0 <= pid < num:
      raise ConfigError(f"process id {pid} is outside [0, {num}) processes")
    if num == 1:
      return False
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  elif (kind := _managed_multihost(environ)) is not None:
    logging.info("multi-host %s environment detected: jax.distributed.initialize()", kind)
    jax.distributed.initialize()
  else:
    return False
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """Process 0 writes files, logs metrics and draws the progress bar."""
  return jax.process_index() == 0


def process_rows(num_rows: int, sharding: NamedSharding) -> slice:
  """The rows of a [num_rows, ...] batch that this process's devices hold.

  Batch shardings put each process's devices on a contiguous block of rows
  (jax.make_mesh orders devices by process); anything else raises.
  """
  index_map = sharding.addressable_devices_indices_map((num_rows,))
  spans = sorted({(idx[0].start or 0, num_rows if idx[0].stop is None else idx[0].stop)
                  for idx in index_map.values()})
  start, stop = spans[0][0], spans[-1][1]
  covered = sum(b - a for a, b in spans)
  if covered != stop - start:
    raise ValueError(f"this process's devices hold rows {spans} of {num_rows}: not one "
                     "contiguous block; order the mesh's devices by process")
  return slice(start, stop)


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding,
                num_rows: int | None = None) -> dict[str, jax.Array]:
  """Host arrays -> global arrays sharded by rows, each process feeding its own devices.

  `batch` holds either the whole global batch (every process the same; only
  this process's rows are transferred) or just this process's rows
  (`process_rows`), in which case `num_rows` gives the global row count.
  """
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), sharding)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    total = v.shape[0] if num_rows is None else num_rows
    rows = process_rows(total, sharding)
    local = v[rows] if v.shape[0] == total else v
    if local.shape[0] != rows.stop - rows.start:
      raise ValueError(f"batch[{k!r}] has {v.shape[0]} rows; this process holds rows "
                       f"{rows.start}:{rows.stop} of {total}")
    out[k] = jax.make_array_from_process_local_data(sharding, local, (total,) + v.shape[1:])
  return out


def fetch(tree: Any) -> Any:
  """Global arrays -> NumPy on every host (an all-gather where not addressable here).

  A collective when some leaf lives partly on other processes: every process
  must call it, in the same order. The leaves that need it are replicated by
  one jitted identity (one compile per tree, not one per leaf).
  """
  leaves, treedef = jax.tree.flatten(tree)
  spread = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
            and not x.is_fully_addressable and not x.is_fully_replicated]
  named = [i for i in spread if isinstance(leaves[i].sharding, NamedSharding)]
  if named:
    rep = tuple(NamedSharding(leaves[i].sharding.mesh, PartitionSpec()) for i in named)
    gathered = _replicate(rep)(tuple(leaves[i] for i in named))
    for i, x in zip(named, gathered):
      leaves[i] = x
  for i in set(spread) - set(named):
    leaves[i] = multihost_utils.process_allgather(leaves[i], tiled=True)
  return jax.tree.unflatten(treedef, [np.asarray(jax.device_get(x)) for x in leaves])


@functools.lru_cache(maxsize=64)
def _replicate(shardings: tuple[NamedSharding, ...]):
  """A jitted identity onto `shardings`, made once per layout (the loop's fetch
  of every step's rollout reuses it instead of recompiling)."""
  return jax.jit(lambda xs: xs, out_shardings=shardings)


def score_on_hosts(runner, prompts: Sequence[str], completions: Sequence[str],
                   references: Sequence[str]):
  """`runner.score` (r1jax.rewards.RewardRunner) with the rows split over processes.

  Process p scores the p-th contiguous share of the rows; the per-function
  rewards and error/timeout counts are all-gathered, so every process returns
  what one process scoring everything would: (total_N, per_fn, stats).
  """
  n, P = len(completions), jax.process_count()
  if P == 1:
    return runner.score(prompts, completions, references)
  per = -(-n // P)
  mine = slice(min(jax.process_index() * per, n), min((jax.process_index() + 1) * per, n))
  _, per_fn, stats = runner.score(prompts[mine], completions[mine], references[mine])
  names = list(runner.fns)
  values = np.zeros((len(names), per), np.float32)
  counts = np.zeros((len(names), 2), np.int64)
  for k, name in enumerate(names):
    values[k, :mine.stop - mine.start] = per_fn[name]
    counts[k] = (stats[f"rewards/{name}/errors"], stats[f"rewards/{name}/timeouts"])
  all_values, all_counts = multihost_utils.process_allgather((values, counts))  # [P, ...]
  values_FN = np.concatenate(list(all_values), axis=1)[:, :n]
  counts_F2 = all_counts.sum(axis=0)
  per_fn, stats = {}, {}
  total_N = np.zeros(n, np.float32)
  for k, name in enumerate(names):
    per_fn[name] = values_FN[k]
    total_N += np.float32(runner.fns[name][1]) * values_FN[k]
    stats[f"rewards/{name}/mean"] = float(values_FN[k].mean()) if n else 0.0
    stats[f"rewards/{name}/errors"] = int(counts_F2[k, 0])
    stats[f"rewards/{name}/timeouts"] = int(counts_F2[k, 1])
  stats["rewards/total/mean"] = float(total_N.mean()) if n else 0.0
  return total_N, per_fn, stats
