r"""Runs the DIViTA protocol: dataset -> clip representations -> 3 folds.

  python -m divita_jax.main --config=configs/divita.py --workdir=/tmp/divita

Multi-host (TPU pod slices, SLURM, multi-GPU hosts): pass
`--coordinator_address=host:port --num_processes=N --process_id=i`, or
`--distributed` alone where `jax.distributed.initialize()` finds them itself.
"""

import json
import logging as std_logging
import os
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
  "overwrite",
  False,
  "The workdir holds another config's results: move them aside to "
  "previous-<time>/ (nothing is deleted) and start anew.",
)
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


class QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of orbax (several lines per checkpoint), the TPU
  backend probe and TFDS's size notices; --verbosity=1 keeps them."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if FLAGS.verbosity >= 1 or record.levelno >= std_logging.ERROR:
      return True
    path = record.pathname
    if "/orbax/" in path and record.levelno < std_logging.ERROR:
      return False
    if "/jax/_src/xla_bridge" in path:  # "Unable to initialize backend".
      return False
    return not (
      "tensorflow_datasets" in path and "Unknown size" in str(record.msg)
    )


def quiet_native_logs() -> None:
  """TensorFlow's C++ notices (oneDNN, ...) before anything imports it."""
  if "--verbosity" not in " ".join(sys.argv) and "-v" not in sys.argv:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _config_yaml(config) -> str:
  """The config as plain YAML (no !!python/tuple tags)."""
  import yaml

  return yaml.safe_dump(json.loads(config.to_json_best_effort()), width=80)


def parse_flags(argv):
  """absl flag parsing; a config typo is one line, not a traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    msg = str(e.args[0] if e.args else e).strip("'\"")
    msg = " ".join(msg.replace("\\n", "\n").replace("\\'", "'").split())
    if isinstance(e, (AttributeError, KeyError)):
      msg = f"unknown config field {msg}"
    sys.exit(f"divita_jax.main: error: {msg}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from divita_jax.configs import checks

  try:  # Every config value, before devices, dataset or workdir.
    checks.check(FLAGS.config)
  except checks.ConfigError as e:
    sys.exit(f"divita_jax.main: error: {e}")
  logging.get_absl_handler().addFilter(QuietLibraries())
  std_logging.getLogger().addFilter(QuietLibraries())
  initialize_distributed()
  from divita_jax import run
  from divita_jax.trainers import checkpoints

  print(f"Config:\n{_config_yaml(FLAGS.config)}", flush=True)
  try:
    run.run(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  except checkpoints.Preempted as e:
    logging.warning("%s Exiting; rerun the same command to resume.", e)
    sys.exit(128 + e.signum)
  # ConfigError: the mesh and batch sizes on these devices; WorkdirError
  # (a ConfigError) the workdir and the files the config names.
  except (checks.ConfigError, checkpoints.ConfigMismatch) as e:
    sys.exit(f"divita_jax.main: error: {e}")
  except KeyboardInterrupt:  # Before training (dataset build, extraction).
    sys.exit(
      "divita_jax.main: interrupted; what was written is kept, rerun the "
      "same command to resume."
    )


if __name__ == "__main__":
  quiet_native_logs()
  app.run(main, flags_parser=parse_flags)
