"""Builds trailers12k: the TFDS CLI's `build` command on this folder.

  python -m tfds_trailers12k --config=synthetic --data_dir=DIR
  python -m tfds_trailers12k --config=raw --manual_dir=MANUAL --data_dir=DIR
  python -m tfds_trailers12k --config=raw --manual_dir=MANUAL --data_dir=DIR \
    --beam_runner=FnApiRunner \
    --beam_options=--direct_num_workers=0,--direct_running_mode=multi_processing

`--help` lists the flags a build of this dataset needs; `--helpfull` every
flag of `tfds build`, all accepted here too. (The `tfds` console script of
tensorflow-datasets 4.9.10 imports apache_beam even to run `tfds build`;
with it installed, `tfds build tfds_trailers12k ...` from the repository
root is equivalent, its `--beam_pipeline_options` instead of ours.)
"""

import argparse
import os

from absl import app
from tensorflow_datasets.scripts.cli import build, cli_utils

from tfds_trailers12k.tfds_trailers12k_dataset_builder import RETRY_SKIPPED_ENV

_FOLDER = os.path.dirname(os.path.abspath(__file__))
_tfds_parse = cli_utils.make_flags_parser(build.Args, description=__doc__)


_EPILOG = """\
One host, one Beam worker per core:
  --beam_runner=FnApiRunner \\
  --beam_options=--direct_num_workers=0,--direct_running_mode=multi_processing
--helpfull: every flag of `tfds build` (accepted here too)."""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m tfds_trailers12k",
    description="Builds the TFDS dataset trailers12k (array_record).",
    epilog=_EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,  # Leave other flags whole for tfds build.
  )
  p.add_argument(
    "--config",
    default="synthetic",
    help="synthetic (generated, no download) | raw (your videos + "
    "mtgc.csv) | reps (labels and folds of the official zarr groups).",
  )
  p.add_argument("--data_dir", help="Where the dataset goes.")
  p.add_argument(
    "--manual_dir", help="raw / reps: mtgc.csv, videos/, metadata.json."
  )
  p.add_argument(
    "--retry_skipped",
    action="store_true",
    help="Re-attempt trailers an interrupted build saved as skipped.",
  )
  p.add_argument(
    "--beam_runner",
    default="",
    help="Build with Apache Beam on this runner (FnApiRunner, "
    "DataflowRunner, FlinkRunner, SparkRunner, ...); needs .[beam].",
  )
  p.add_argument(
    "--beam_options",
    default="",
    help="Beam pipeline flags, comma separated (example below).",
  )
  p.add_argument(
    "--overwrite", action="store_true", help="Rebuild an existing dataset."
  )
  p.add_argument("--helpfull", action="store_true", help="Every flag.")
  return p


def _beam_pipeline_options(runner: str, options: str) -> str:
  """Our Beam flags as `tfds build --beam_pipeline_options`'s value."""
  if not runner and not options:
    return ""
  try:
    import apache_beam  # noqa: F401, PLC0415
  except ImportError as e:  # tfds build would drop the options silently.
    raise SystemExit(
      f"--beam_runner / --beam_options need apache_beam ({e}): "
      "pip install -e '.[beam]'."
    ) from e
  flags = [f"runner={runner}"] if runner else []
  for flag in options.split(","):
    if flag and not flag.startswith("--"):
      raise SystemExit(f"--beam_options: {flag!r} is not a --name=value flag.")
    flags += [flag[2:]] if flag else []
  return ",".join(flags)


def _parse_flags(argv: list[str]) -> build.Args:
  ours, rest = _parser().parse_known_args(argv[1:])
  if ours.helpfull:
    return _tfds_parse([argv[0], "--help"])  # Prints and exits.
  if ours.retry_skipped:  # Ours, not tfds build's.
    os.environ[RETRY_SKIPPED_ENV] = "1"
  args = [argv[0], _FOLDER, f"--config={ours.config}"]
  args += [f"--data_dir={ours.data_dir}"] if ours.data_dir else []
  args += [f"--manual_dir={ours.manual_dir}"] if ours.manual_dir else []
  args += ["--overwrite"] if ours.overwrite else []
  beam = _beam_pipeline_options(ours.beam_runner, ours.beam_options)
  args += [f"--beam_pipeline_options={beam}"] if beam else []
  return _tfds_parse(args + rest)


def main(args: build.Args) -> None:
  args.execute()


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
