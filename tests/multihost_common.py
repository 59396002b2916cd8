"""Start of a multi-host test worker: fake CPU devices, then the gloo job."""

import os
import sys


def start(num_processes: int, process_id: int, port: str, devices: int):
  """Joins a `num_processes` JAX job on 127.0.0.1:port; returns jax.

  Call before anything imports jax: the device count is read at import.
  Also puts the repository root on sys.path (for `configs`).
  """
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes > 1:
    jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=num_processes,
      process_id=process_id,
    )
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, os.path.dirname(here))
  return jax
