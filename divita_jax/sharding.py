"""Device mesh, logical axis rules and batch placement.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the
config maps them to mesh axes (`c.mesh.rules`). Batches are split along the
`data` mesh axis. The same code runs on one process or many: every process
passes only its share of a batch to `hosts.global_batch`.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry of `shape` so the product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ValueError(f"Mesh shape {shape}: at most one axis may be -1.")
  known = int(np.prod([s for s in shape if s != -1]))
  if known <= 0 or num_devices % known:
    raise ValueError(
      f"Mesh shape {shape} does not divide the {num_devices} devices."
    )
  shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
      f"Mesh shape {shape} uses {int(np.prod(shape))} devices, but "
      f"{num_devices} are available."
    )
  return shape


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh from `c.mesh` (`shape`, `axes`); -1 fills with the devices."""
  devices = jax.devices() if devices is None else list(devices)
  axes = tuple(mesh_config.axes)
  if len(axes) != len(mesh_config.shape):
    raise ValueError(
      f"Mesh axes {axes} and shape {tuple(mesh_config.shape)} differ in length."
    )
  shape = mesh_shape(mesh_config.shape, len(devices))
  if devices == jax.devices():
    # Topology-aware device order (ICI neighbours together on TPU).
    grid = mesh_utils.create_device_mesh(shape, devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, axes)


def logical_rules(mesh_config) -> tuple[tuple[str, str | None], ...]:
  return tuple(
    (str(k), None if v is None else str(v)) for k, v in mesh_config.rules
  )


# Parameters smaller than this (norm scales, biases) stay replicated over
# `fsdp`: gathering them would cost more than they weigh.
FSDP_MIN_SIZE = 256


def with_fsdp(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """`spec` plus the `fsdp` mesh axis on the largest free dimension it
  divides (ZeRO-3 / FSDP: each device keeps 1/fsdp of the array and XLA
  gathers it where used). Unchanged without an `fsdp` axis > 1, for small
  arrays, or when no free dimension divides."""
  n = dict(mesh.shape).get("fsdp", 1)
  if n == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  free = [i for i, e in enumerate(entries) if e is None and shape[i] % n == 0]
  if not free:
    return spec
  i = max(free, key=lambda i: (shape[i], -i))  # Largest; first on ties.
  entries[i] = "fsdp"
  return PartitionSpec(*entries)


def dividing(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """`spec` without the mesh axes that do not divide their dimension (e.g.
  `model` on the one attention head of Swin's first stage): unsplit."""

  def size(entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[n] for n in names if n is not None]))

  entries = [e if d % size(e) == 0 else None for e, d in zip(spec, shape)]
  return PartitionSpec(*entries)


def tree_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree holding `nn.Partitioned` (logical) leaves:
  logical names -> mesh axes by `rules` (tensor parallelism over `model`;
  `dividing`), then `with_fsdp`. Leaves without logical names are
  replicated (or only fsdp-sharded)."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
  shapes = nn.meta.unbox(abstract_tree)

  def one(spec, x):
    spec = dividing(spec, x.shape, mesh)
    return NamedSharding(mesh, with_fsdp(spec, x.shape, mesh))

  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree.map(one, specs, shapes, is_leaf=is_spec)


# Mesh axes that split the batch, in this order, where the mesh has them:
# `fsdp` shards parameters and splits the batch too (ZeRO-3 style).
BATCH_AXES = ("data", "fsdp")


def batch_axes(mesh: Mesh) -> str | tuple[str, ...]:
  """The mesh axes the batch is split over: 'data', or ('data', 'fsdp')."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return axes[0] if len(axes) == 1 else axes


def batch_sharding(mesh: Mesh, data_axis=None) -> NamedSharding:
  """Leading (batch) axis split over `data_axis` (default: batch_axes),
  the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(data_axis or batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
