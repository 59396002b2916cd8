"""The TFDS CLI's `build` command for trailers12k, without its entry point.

The `tfds` console script of tensorflow-datasets 4.9.10 imports apache_beam
(for its `convert_format` command) even to run `tfds build`. This runs the
very same `build` command with the same flags on this folder:

  python -m tfds_trailers12k --config=synthetic --data_dir=DIR
  python -m tfds_trailers12k --config=raw --manual_dir=MANUAL --data_dir=DIR
  python -m tfds_trailers12k ... --retry_skipped  # re-attempt saved skips

With apache_beam installed, `tfds build tfds_trailers12k ...` (from the
repository root) is equivalent.
"""

import os

from absl import app
from tensorflow_datasets.scripts.cli import build, cli_utils

from tfds_trailers12k.tfds_trailers12k_dataset_builder import RETRY_SKIPPED_ENV

_parse = cli_utils.make_flags_parser(build.Args, description=__doc__)


def _parse_flags(argv: list[str]) -> build.Args:
  if "--retry_skipped" in argv:  # Ours, not tfds build's.
    argv = [a for a in argv if a != "--retry_skipped"]
    os.environ[RETRY_SKIPPED_ENV] = "1"
  return _parse(
    [argv[0], os.path.dirname(os.path.abspath(__file__)), *argv[1:]]
  )


def main(args: build.Args) -> None:
  args.execute()


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
