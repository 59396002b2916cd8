"""The `trailers12k` presets' checkpoint paths: under `checkpoints_dir`,
moved by one override, and each one written by a README command."""

import os
import re
import sys
from unittest import mock

from absl import flags
from ml_collections import config_flags

from configs import studies
from divita_jax.configs import divita

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "divita.py")

# Every preset that names real checkpoints, with the branches it sets.
PRESETS = [
  *(f"trailers12k,{p}" for p in divita.TABLE6),
  *(f"trailers12k,{p}" for p in divita.SINGLE),
  "trailers12k,swin,audio",
  "trailers12k,swin,audio,whisper",
]


def _parse(*argv):
  """The config as `python -m divita_jax.main ARGV` parses it."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values)
  # The override flags are found in sys.argv, as main's are.
  with mock.patch.object(sys, "argv", ["main", *argv]):
    values(["main", *argv])
  return values.config


def _checkpoints(config) -> dict:
  return {
    b: config.backbones[b].checkpoint
    for b in config.model.branches
    if config.backbones[b].checkpoint
  }


def test_checkpoints_dir_moves_every_preset_checkpoint():
  for preset in PRESETS:
    default = _checkpoints(_parse(f"--config={CONFIG}:{preset}"))
    moved = _checkpoints(
      _parse(f"--config={CONFIG}:{preset}", "--config.checkpoints_dir=/data/ck")
    )
    assert default and default.keys() == moved.keys(), preset
    for branch, path in default.items():
      folder = path.removeprefix("checkpoints/")
      assert path == f"checkpoints/{folder}", (preset, path)
      assert moved[branch] == f"/data/ck/{folder}", (preset, moved)


def test_an_explicit_checkpoint_overrides_the_preset_alone():
  config = _parse(
    f"--config={CONFIG}:trailers12k,swin",
    "--config.checkpoints_dir=/data/ck",
    "--config.backbones.image.checkpoint=/elsewhere/swin",
  )
  assert config.backbones.image.checkpoint == "/elsewhere/swin"
  assert config.backbones.video.checkpoint == "/data/ck/swin3d_t_k400"


def test_studies_read_the_checkpoints_dir():
  config = _parse(
    f"--config={CONFIG}:trailers12k", "--config.checkpoints_dir=/data/ck"
  )
  fields = studies.backbones(config)["axes"]["backbones"]["swin"]
  assert fields["backbones.image.checkpoint"] == "/data/ck/swin_t_in1k"


def _readme() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def test_every_preset_folder_is_written_by_a_readme_command():
  written = set(re.findall(r"--output checkpoints/([\w.\-]+)", _readme()))
  folders = {path for path in divita.AUDIO_CHECKPOINTS.values()}
  folders |= {
    folder for pair in divita.TABLE6.values() for _, folder, _ in pair
  }
  folders |= {entry[2] for entry in divita.SINGLE.values()}
  assert folders - written == set()


def test_every_checkpoint_folder_the_readme_reads_it_writes():
  text = _readme()
  written = set(re.findall(r"--output checkpoints/([\w.\-]+)", text))
  read = set(re.findall(r"checkpoint=checkpoints/([\w.\-]+)", text))
  read |= set(re.findall(r"checkpoints/([\w.\-]+)`", text))
  assert read, "the README names no checkpoint folder it reads"
  assert read - written == set()
