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


# INFO lines kept at --verbosity=0: one per stage (dataset, extraction,
# fold), and a fold's own lines elsewhere ("Fold 0: resuming at step 12").
STAGE_MODULES = (
  "divita_jax/run.py",
  "divita_jax/extract.py",
  "divita_jax/main.py",
)
FOLD_LINE = "Fold "
# TFDS warnings of every build: a custom config (ours always are), and the
# version folder it is about to write, not yet holding dataset_info.json.
TFDS_NOTICES = ("Using custom data configuration", "has no dataset_info.json")


class QuietLibraries(std_logging.Filter):
  """At verbosity 0: warnings and errors, and INFO only from the stage
  lines (and a fold's own lines); never orbax's notices (several per
  checkpoint, also warnings), the TPU backend probe or TFDS's per-build
  notices. Verbosity >= 1 keeps everything."""

  def __init__(self, verbosity: int | None = None):
    super().__init__()
    self.verbosity = verbosity  # None: absl's --verbosity, when filtering.

  def filter(self, record: std_logging.LogRecord) -> bool:
    verbosity = FLAGS.verbosity if self.verbosity is None else self.verbosity
    if verbosity >= 1 or record.levelno >= std_logging.ERROR:
      return True
    path = record.pathname.replace(os.sep, "/")
    if "/orbax/" in path or "/jax/_src/xla_bridge" in path:
      return False
    if "/tensorflow_datasets/" in path:
      if record.levelno < std_logging.WARNING:
        return False
      msg = record.getMessage()
      return not any(notice in msg for notice in TFDS_NOTICES)
    if record.levelno < std_logging.WARNING:
      fold_line = str(record.msg).startswith(FOLD_LINE)
      return path.endswith(STAGE_MODULES) or (
        "/divita_jax/" in path and fold_line
      )
    return True


def quiet_libraries(verbosity: int):
  """QuietLibraries on absl's logger (orbax, TFDS and clu log through it)
  and on the handlers logging has now (absl's, under app.run; jax's own
  loggers reach those). Returns a function that removes it again (for
  predict.main called in a longer-lived process)."""
  quiet = QuietLibraries(verbosity)
  where = (std_logging.getLogger("absl"), *std_logging.root.handlers)
  for w in where:
    w.addFilter(quiet)

  def remove():
    for w in where:
      w.removeFilter(quiet)

  return remove


def quiet_native_logs(argv: list[str] | None = None) -> None:
  """TensorFlow's C++ notices (oneDNN, ...) before anything imports it;
  unless the command line asks for --verbosity (or -v) >= 1."""
  argv = sys.argv if argv is None else argv
  if argv_verbosity(argv) < 1:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def argv_verbosity(argv: list[str]) -> int:
  """The last --verbosity=N / -v N of a command line (absl's spellings),
  read before flags are parsed; 0 if none (or not a number)."""
  level = "0"
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name in ("--verbosity", "-v", "--v"):
      level = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
  return int(level) if level.lstrip("-").isdigit() else 0


def quiet_progress_bars() -> None:
  """No TFDS progress bars (its build stages and our workers' trailers)
  when stderr is not a terminal: in a log they are escape codes; each
  stage still ends with its one-line summary."""
  if not sys.stderr.isatty():
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(False)


def _config_yaml(config) -> str:
  """The config as plain YAML (no !!python/tuple tags)."""
  import yaml

  return yaml.safe_dump(json.loads(config.to_json_best_effort()), width=80)


def config_summary(config, workdir: str) -> str:
  """One line: the config file and variants, dataset, branches, backbones,
  folds and workdir."""
  name = config_flags.get_config_filename(FLAGS["config"])
  overrides = len(config_flags.get_override_values(FLAGS["config"]))
  d = config.dataset
  data = d.config
  if d.config == "synthetic":
    data += f" ({d.num_trailers} trailers)"
  elif d.manual_dir:
    data += f" ({d.manual_dir})"
  branches = "+".join(config.model.branches)
  if d.config == "reps":
    nets = "official zarr representations"
  else:
    nets = ", ".join(
      f"{b} {_backbone(config.backbones[b])}" for b in config.model.branches
    )
  more = f" + {overrides} override(s)" if overrides else ""
  return (
    f"divita_jax.main: {name}{more}; dataset {data}; {branches}, "
    f"{config.model.fusion} fusion; backbones {nets}; folds "
    f"{','.join(map(str, config.folds))}; workdir {workdir} (config.json "
    "there; --verbosity=1 prints it)"
  )


def _backbone(b) -> str:
  if b.checkpoint:
    return b.checkpoint
  return f"{b.kind} {b.variant} (random init)"


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
  from divita_jax import inputs
  from divita_jax.configs import checks

  try:  # Every config value, before devices, dataset or workdir.
    checks.check(FLAGS.config)
  except checks.ConfigError as e:
    sys.exit(f"divita_jax.main: error: {e}")
  try:  # The files the dataset reads, before the workdir is made.
    inputs.check(FLAGS.config, FLAGS.workdir)
  except inputs.InputError as e:
    sys.exit(f"divita_jax.main: error: {e}")
  quiet_libraries(FLAGS.verbosity)
  initialize_distributed()
  quiet_progress_bars()
  from divita_jax import run
  from divita_jax.trainers import checkpoints

  if FLAGS.verbosity >= 1:
    print(f"Config:\n{_config_yaml(FLAGS.config)}", flush=True)
  else:
    print(config_summary(FLAGS.config, FLAGS.workdir), flush=True)
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
