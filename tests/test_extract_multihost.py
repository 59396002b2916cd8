"""Two JAX processes extract with converted checkpoints; one has no work.

Loading a converted checkpoint (orbax) ends in a barrier of all processes:
a process whose share is already stored must still reach it, or the other
one waits until the coordination service gives up (a hang on accelerators).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from divita_jax import extract
from divita_jax.models import backbone
from divita_jax.pipelines import stores
from tests.test_extract import _config, _mp4, _record

pytestmark = pytest.mark.xdist_group("multihost_extract")

WORKER = os.path.join(os.path.dirname(__file__), "multihost_extract_worker.py")
IDS = [f"tt{i}" for i in range(4)]


def source() -> list[dict]:
  """4 trailers of 2 shots (the same in every process: fixed seeds)."""
  return [_record(i, _mp4(8, seed), 8) for seed, i in enumerate(IDS)]


def config(root: str):
  c = _config()
  c.backbones.image.checkpoint = os.path.join(root, "vit")
  c.backbones.video.checkpoint = os.path.join(root, "vivit")
  return c


def _convert(root: str) -> None:
  for kind in ("vit", "vivit"):
    _, params, spec = backbone.create_backbone(
      kind, "tiny/8", resolution=32, num_frames=4
    )
    params = params["params"]
    backbone.save_backbone(os.path.join(root, kind), params, spec)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_process_with_nothing_left_joins_the_checkpoint_barrier(tmp_path):
  root = str(tmp_path)
  _convert(root)
  c = config(root)
  # Process 1's share (every other trailer) is already extracted.
  for b in ("image", "video"):
    store = stores.NpyStore(
      os.path.join(root, "reps"), extract.backbone_tag(c, b)
    )
    for tid in IDS[1::2]:
      store.write(tid, np.zeros((2, 64), np.float32))
  port = str(_free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, root, "2", str(p), port],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for p in range(2)
  ]
  outputs = []
  try:
    for p in procs:  # The bug: gloo DEADLINE_EXCEEDED after 30 s, or a hang.
      outputs.append(p.communicate(timeout=120)[0])
      assert p.returncode == 0, outputs[-1][-3000:]
  finally:
    for p in procs:
      p.kill()
  written = [json.loads(o.strip().splitlines()[-1])["written"] for o in outputs]
  assert written == [IDS[0::2], []]
