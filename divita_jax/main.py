r"""Runs the DIViTA protocol: dataset -> clip representations -> 3 folds.

  python -m divita_jax.main --config=configs/divita.py --workdir=/tmp/divita

Multi-host (TPU pod slices, SLURM, multi-GPU hosts): pass
`--coordinator_address=host:port --num_processes=N --process_id=i`, or
`--distributed` alone where `jax.distributed.initialize()` finds them itself.
"""

import logging as std_logging
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/divita.py:variant.",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")
flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() with auto-detection."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime before anything touches a device."""
  import jax

  if FLAGS.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  elif FLAGS.distributed:
    jax.distributed.initialize()


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of orbax (several lines per checkpoint)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname
    return not noisy or record.levelno >= std_logging.WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize_distributed()
  from divita_jax import run  # Imported after the runtime is initialized.
  from divita_jax.checkpoints import Preempted

  logging.info("Config:\n%s", FLAGS.config)
  try:
    run.run(FLAGS.config, FLAGS.workdir)
  except Preempted as e:
    logging.warning("%s Exiting; rerun the same command to resume.", e)
    sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
  app.run(main)
