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


def tree_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree holding `nn.Partitioned` (logical) leaves.

  Leaves without logical names are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
  """Leading (batch) axis split over `data_axis`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(data_axis))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(
  global_size: int, mesh: Mesh, name: str, data_axis: str = "data"
) -> int:
  """Returns the per-process batch size; errors if it doesn't divide."""
  procs = jax.process_count()
  data = mesh.shape[data_axis]
  if global_size % procs or global_size % data:
    raise ValueError(
      f"{name}={global_size} must be divisible by the number of processes "
      f"({procs}) and by the '{data_axis}' mesh axis size ({data})."
    )
  return global_size // procs
