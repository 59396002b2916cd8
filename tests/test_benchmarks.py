"""Every benchmark's `--smoke` run prints its tables with finite numbers.

The scripts run in this process (`runpy`, as `python benchmarks/x.py
--smoke` would), so they share one import of JAX, torch and transformers;
temporary files go to the test's tmp_path. They share a worker under
`pytest -n 2 --dist loadgroup`.
"""

import os
import re
import runpy
import sys
import tempfile

import pytest

BENCHMARKS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"
)

# script -> (extra flags, {row start: rows expected}, lines that must appear).
# Budget: the two heaviest run part of their --smoke here: gpu_smoke the
# attention kinds and one ConvNet (as before), finetune ViViT without the
# memory table (Swin-3D and memory would add ~100 s on 2 cores).
SMOKES = {
  "attention.py": ((), {"    2    197": 1, "    1    785": 1}, ()),
  "audio.py": (
    (),
    {
      "| AST front end |": 1,
      "| Whisper 80 front end |": 1,
      "| Whisper 128 front end |": 1,
      "| AST 64x32 |": 1,
      "| Whisper enc 100x16 |": 1,
    },
    (),
  ),
  "backbones.py": (
    (),
    {
      "ViT-tiny/8 ": 4,
      "ViViT-tiny/8x2 ": 4,
      "Swin-tiny ": 2,
      "VSwin-tiny/4 ": 2,
    },
    (),
  ),
  "clip_encoders.py": (
    (),
    {"| V-JEPA 2 tiny/8": 1, "| VideoPrism tiny/8": 1},
    (),
  ),
  "clips.py": (
    ("--cache_dir={tmp}",),
    {"| naive full decode": 1, "| sample_clips, ": 2},
    (),
  ),
  "costs.py": (
    (),
    {
      f"| {name} |": 3  # Costs, GMACs cross-check, speed.
      for name in (
        "ShuffleNet-2D x0.5",
        "ShuffleNet-3D 0.5x",
        "ResNet-18",
        "R(2+1)D-10",
        "Swin-2D tiny",
        "Swin-3D tiny",
      )
    },
    ("- params, backbones + one DIViTA head each:",),
  ),
  "frame_encoders.py": (
    (),
    {"| SigLIP tiny/8 |": 2, "| DINOv2 tiny/8 |": 2, "| DINOv3 tiny/8 |": 2},
    (),
  ),
  "dataset_build.py": (
    (),
    {"| local |": 1, "| beam |": 1, "| beam, prepared |": 1},
    ("beam - local: ",),
  ),
  "finetune.py": (
    ("--kinds=vivit", "--no_memory"),
    {
      "| ViViT tiny/8 | jax |": 1,
      "| ViViT tiny/8 | torch |": 1,
      "| ViViT | 2 / 0 |": 1,  # Data wait.
    },
    ("load average (1, 5, 15 min) at start",),
  ),
  "gpu_smoke.py": (
    ("--backbones=ViT,ShuffleNet3D",),
    {"| ViT |": 6, "| ShuffleNet3D |": 2, "| TransNetV2 |": 1},
    (
      "| head, 2 epochs: compiled train / eval programs | 1 / 1",
      "| global batch rows in process order | ok |",
    ),
  ),
  "head.py": (
    ("--dir={tmp}/zarr",),
    {
      "| preload | 0 |": 1,
      "| stream | 1 |": 1,
      "| threads | 0 |": 1,
      "| zarr-api | 0 |": 1,
      "Reference scheme (PyTorch head": 1,
    },
    (),
  ),
  "shots.py": (
    (),
    {
      "| decode only": 1,
      "| ours: detect_shots": 1,
      "| before: PyAV": 1,
      "| scenedetect CLI": 1,
      "| score of a frame pair |": 1,  # --breakdown
    },
    ("PySceneDetect's ContentDetector fed the same frames: True",),
  ),
}


def run_smoke(script, flags, tmp_path, monkeypatch, capsys) -> str:
  """stdout of `python benchmarks/<script> --smoke <flags>`."""
  path = os.path.join(BENCHMARKS, script)
  flags = [flag.format(tmp=tmp_path) for flag in flags]
  monkeypatch.syspath_prepend(BENCHMARKS)  # Siblings: timing, loadavg.
  monkeypatch.setattr(sys, "argv", [path, "--smoke", *flags])
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  runpy.run_path(path, run_name="__main__")
  return capsys.readouterr().out


def numbers_are_finite(line: str) -> bool:
  """At least one decimal number in the row, and no nan or inf."""
  return bool(re.search(r"\d\.\d", line)) and not re.search(
    r"\b(nan|inf)\b", line, re.IGNORECASE
  )


@pytest.mark.xdist_group("benchmarks")
@pytest.mark.parametrize("script", sorted(SMOKES))
def test_smoke_prints_every_row(script, tmp_path, monkeypatch, capsys):
  flags, rows, lines = SMOKES[script]
  out = run_smoke(script, flags, tmp_path, monkeypatch, capsys)
  printed = out.splitlines()
  for start, count in rows.items():
    found = [line for line in printed if line.startswith(start)]
    assert len(found) == count, (start, found, out[-3000:])
    bad = [line for line in found if not numbers_are_finite(line)]
    assert not bad, bad
  for line in lines:
    assert line in out, (line, out[-3000:])
