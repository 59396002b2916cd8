"""Feature extraction: real tiny backbones over real clips, faults, resume."""

import io
import json
import os

import av
import numpy as np

from divita_jax import extract, video
from divita_jax.configs import divita
from divita_jax.models import backbone


def _mp4(num_frames: int, seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4") as out:
    stream = out.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
    for _ in range(num_frames):
      frame = np.broadcast_to(
        rng.integers(0, 255, 3, dtype=np.uint8), (32, 48, 3)
      )
      out.mux(
        stream.encode(
          av.VideoFrame.from_ndarray(
            np.ascontiguousarray(frame), format="rgb24"
          )
        )
      )
    out.mux(stream.encode())
  return buf.getvalue()


def _record(tid: str, data: bytes, num_frames: int) -> dict:
  half = num_frames // 2
  return {
    "id": tid.encode(),
    "video": data,
    "shots": np.array([[0, half], [half, num_frames]], np.int32),
  }


def _config():
  config = divita.get_config()
  config.clips.frames_per_clip = 4
  config.backbones.image.batch_size = 8
  config.backbones.video.batch_size = 8
  return config


def test_extract_writes_skips_and_resumes(tmp_path):
  good = _mp4(24, 0)
  source = [
    _record("tt1", good, 24),
    _record("tt2", good[: len(good) // 3], 24),  # Truncated mid-stream.
    _record("tt3", b"", 24),  # File vanished before packaging: no bytes.
    _record("tt4", _mp4(16, 1), 16),
  ]
  ids = ["tt1", "tt2", "tt3", "tt4"]
  root = str(tmp_path / "reps")
  stores = extract.extract(_config(), source, ids, root)

  for b in ("image", "video"):
    assert stores[b].ids() == ["tt1", "tt4"]
    feats = stores[b].read("tt1")
    assert feats.shape == (2, 64) and np.isfinite(feats).all()
  with open(os.path.join(root, "skipped_p0.json")) as f:
    skipped = {s["id"]: s["reason"] for s in json.load(f)}
  assert sorted(skipped) == ["tt2", "tt3"]
  assert all(reason for reason in skipped.values())

  # Features equal the backbone applied directly to the sampled clips.
  config = _config()
  module, params, spec = extract.make_backbone(config, "video")
  clips, _ = video.sample_clips(
    good, source[0]["shots"], frames_per_clip=4, fps=8.0, resolution=32
  )
  x = video.normalize(clips, *backbone.input_stats(spec))
  direct, _ = module.apply({"params": params}, x)
  np.testing.assert_allclose(stores["video"].read("tt1"), direct, atol=1e-5)

  # A rerun skips what is stored: nothing is rewritten.
  mtime = os.path.getmtime(os.path.join(stores["image"].path, "tt1.npy"))
  extract.extract(_config(), source, ids, root)
  assert (
    os.path.getmtime(os.path.join(stores["image"].path, "tt1.npy")) == mtime
  )


def test_checkpoint_resampled_to_the_clip_size(tmp_path):
  """A converted ViViT of 8 frames at 48 px runs on 4-frame, 32 px clips."""
  _, params, spec = backbone.create_backbone(
    "vivit", "tiny/8", resolution=48, num_frames=8
  )
  backbone.save_backbone(str(tmp_path / "vivit"), params, spec)
  config = _config()
  config.backbones.video.checkpoint = str(tmp_path / "vivit")
  module, params, spec = extract.make_backbone(config, "video")
  assert spec["resolution"] == 32 and spec["num_frames"] == 4
  stats = backbone.input_stats(spec)
  fn = extract.make_feature_fn(module, params, "vivit", stats)
  clips = np.zeros((3, 4, 32, 32, 3), np.uint8)
  assert fn(clips, batch_size=8).shape == (3, 64)
