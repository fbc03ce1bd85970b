"""Device mesh from config and the logical-axis rules that shard the model.

Modules name their axes logically (`embed`, `mlp`, `heads`, `vocab`, ...);
the rules below map those names onto mesh axes (`data`, `fsdp`, `tensor`,
`expert`), so sharding a model differently is a config change, not a rewrite.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# `expert` (last, so meshes without it lay devices out as before) holds the
# routed experts of MoE layers (expert parallelism); size 1 unless configured.
MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Parameters are sharded over `fsdp` (ZeRO-3 style) and `tensor` (Megatron
# style); activations' batch over `data` x `fsdp`.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("expert", "expert"),
)


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor, expert) mesh; absent axes have size 1 and one
  size may be -1 (= the remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
  sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {axis_sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
        f"have {len(devices)}")
  # Auto axes: XLA propagates shardings from our constraints (GSPMD style).
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules=DEFAULT_RULES):
  """Context in which the model's logical constraints resolve on `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def divisible_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> tuple[P, list[str]]:
  """`spec` with each dimension's mesh axes cut back to what divides it.

  A dimension sharded over axes (a, b) whose size their product does not
  divide keeps the longest prefix that does (possibly none: replicated), so
  e.g. a 151,665-token vocabulary, or 9 experts on a 4-way expert axis, still
  lays out (replicated on that axis) instead of failing. Returns the new spec
  and one note per dimension cut.
  """
  entries, notes = [], []
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    keep = list(names)
    while keep and size % int(np.prod([mesh.shape[a] for a in keep])):
      keep.pop()
    if len(keep) < len(names):
      notes.append(f"dim {dim} ({size}) not divisible by {'x'.join(names)}="
                   f"{int(np.prod([mesh.shape[a] for a in names]))}: sharded over "
                   f"{'x'.join(keep) or 'nothing'}")
    entries.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries), notes


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules=DEFAULT_RULES,
                      notes: list | None = None) -> Any:
  """NamedShardings (unboxed) for a pytree of logically-partitioned abstract values.

  Where a dimension does not divide its mesh axes (an odd vocabulary or expert
  count), that dimension is sharded over fewer axes (`divisible_spec`) and a
  warning names the param (also appended to `notes`), instead of failing at
  placement.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  shardings = nn.unbox(nn.logical_to_mesh_sharding(specs, mesh, rules))
  shapes = jax.tree.map(  # unbox without constraining (we may be inside a mesh context)
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
      abstract_boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))

  def fit(path, sharding, shape):
    spec, cut = divisible_spec(sharding.spec, shape.shape, mesh)
    for note in cut:
      where = f"{jax.tree_util.keystr(path)} {tuple(shape.shape)}"
      logging.warning("sharding %s: %s", where, note)
      if notes is not None:
        notes.append(f"{where}: {note}")
    return sharding if not cut else NamedSharding(mesh, spec, memory_kind=sharding.memory_kind)

  return jax.tree_util.tree_map_with_path(fit, shardings, shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded_init(init_fn: Callable[[], Any], mesh: Mesh, rules=DEFAULT_RULES):
  """Runs `init_fn` (returning boxed params) directly into its shardings.

  Returns (unboxed params, their NamedShardings). Nothing is materialised on
  one device first: eval_shape -> logical specs -> jit(out_shardings).
  """
  abstract = jax.eval_shape(init_fn)
  shardings = nn.unbox(logical_shardings(abstract, mesh, rules))
  # No mesh context here: DenseGeneral initialises a flat kernel and reshapes
  # it, so in-init constraints would hit the wrong rank; out_shardings place it.
  with nn.logical_axis_rules(rules):
    params = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
  return params, shardings
