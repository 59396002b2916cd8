"""Feature extraction: real tiny backbones over real clips, faults, resume."""

import io
import json
import os

import av
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from divita_jax import extract, video
from divita_jax.configs import divita
from divita_jax.models import backbone, runtime
from divita_jax.pipelines import extraction


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
  module, variables, spec = runtime.make_backbone(config, "video")
  clips, _ = video.sample_clips(
    good, source[0]["shots"], frames_per_clip=4, fps=8.0, resolution=32
  )
  x = video.normalize(clips, *backbone.input_stats(spec))
  direct, _ = module.apply(variables, x)
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
  params = params["params"]
  backbone.save_backbone(str(tmp_path / "vivit"), params, spec)
  config = _config()
  config.backbones.video.checkpoint = str(tmp_path / "vivit")
  module, params, spec = runtime.make_backbone(config, "video")
  assert spec["resolution"] == 32 and spec["num_frames"] == 4
  stats = backbone.input_stats(spec)
  fn = extract.FeatureFn(module, params, "vivit", stats)
  clips = np.zeros((3, 4, 32, 32, 3), np.uint8)
  assert fn(clips, batch_size=8).shape == (3, 64)


def _tiny(kind: str):
  return backbone.create_backbone(kind, "tiny/8", resolution=32, num_frames=4)


def _clips(n: int, seed: int = 0, frames: int = 4) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, frames, 32, 32, 3), dtype=np.uint8)


def test_normalised_inside_equals_the_host_formula_bitwise():
  x = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 256, 3)
  for stats in backbone.NORMALIZATIONS.values():
    inside = jax.jit(lambda x, s=stats: runtime.normalize(x, *s))(x)
    np.testing.assert_array_equal(inside, video.normalize(x, *stats))


class _Counting(extract.FeatureFn):
  """The real feature function; counts the batches it is given."""

  batches = 0

  def dispatch(self, batch):
    assert batch.dtype == np.uint8  # 1/4 of float32's bytes to the device.
    self.batches += 1
    return super().dispatch(batch)


def test_batches_span_trailers_and_results_return_per_trailer():
  module, variables, spec = _tiny("vivit")
  stats = backbone.input_stats(spec)
  fn = _Counting(module, variables, "vivit", stats)
  trailers = {f"t{i}": _clips(n, i) for i, n in enumerate([5, 11, 0, 3, 9])}
  batcher = extract.Batcher(fn, batch_size=8)
  done = {}
  for key, clips in trailers.items():
    done.update(batcher.add(key, clips))
  done.update(batcher.flush())
  assert fn.batches == 4  # 28 clips in batches of 8; per trailer: 6.
  assert done["t2"].shape == (0, 64)

  # Each trailer equals the backbone on its host-normalised clips alone in
  # zero-padded batches of 8 split over the devices alike, bit for bit
  # (the old per-trailer path).
  direct = jax.jit(
    lambda x: module.apply(variables, x)[0],
    in_shardings=fn.sharding,
  )

  for key, clips in ((k, c) for k, c in trailers.items() if len(c)):
    x = video.normalize(clips, *stats)
    padded = np.zeros((-(-len(x) // 8) * 8,) + x.shape[1:], np.float32)
    padded[: len(x)] = x
    want = np.concatenate(
      [direct(padded[i : i + 8]) for i in range(0, len(x), 8)]
    )
    np.testing.assert_array_equal(done[key], want[: len(x)], err_msg=key)


class _BatchNormNet(nn.Module):
  """A 2-D BatchNorm backbone: (pooled [B, 8], intermediates)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return x.mean(axis=(1, 2)), {}


def test_image_kinds_with_batch_stats_mean_or_centre_frame():
  net = _BatchNormNet()
  variables = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda a: a + 0.5, variables)  # Stats matter.
  stats = backbone.input_stats(None, "imagenet")
  clips = _clips(3, frames=5)
  frames = video.normalize(clips, *stats)  # [3, 5, 32, 32, 3]
  per_frame = net.apply(variables, frames.reshape(15, 32, 32, 3))[0]
  mean = extract.FeatureFn(net, variables, "resnet", stats)
  np.testing.assert_allclose(
    mean(clips, 4), per_frame.reshape(3, 5, 8).mean(1), atol=1e-6
  )
  center = extract.FeatureFn(net, variables, "resnet", stats, "center")
  want = per_frame.reshape(3, 5, 8)[:, 2]  # Frame T // 2.
  np.testing.assert_allclose(center(clips, 4), want, atol=1e-6)
  # The loader may decode the centre frame alone: the same features.
  np.testing.assert_allclose(center(clips[:, 2:3], 4), want, atol=1e-6)


def test_centre_frame_pooling_decodes_one_frame_per_clip(tmp_path):
  config = _config()
  config.model.branches = ("image",)
  config.backbones.image.frame_pooling = "center"
  good = _mp4(24, 0)
  source = [_record("tt1", good, 24)]
  stores = extract.extract(config, source, ["tt1"], str(tmp_path))
  assert stores["image"].tag.endswith("_center")
  decoding = extraction.Decoding(
    video.sample_kwargs(config.clips, 32), center_frame_only=True
  )
  (item,) = extraction.clip_loader(source, np.array([0]), decoding)
  full, info = video.sample_clips(good, source[0]["shots"], **_kwargs())
  np.testing.assert_array_equal(
    item["frame_indices"][:, 0], info["frame_indices"][:, 2]
  )
  np.testing.assert_array_equal(item["clips"][:, 0], full[:, 2])
  module, variables, spec = runtime.make_backbone(config, "image")
  x = video.normalize(full[:, 2], *backbone.input_stats(spec))
  want = module.apply(variables, x)[0]
  np.testing.assert_allclose(stores["image"].read("tt1"), want, atol=1e-5)


def _kwargs():
  return video.sample_kwargs(_config().clips, 32)


def test_decode_processes_default_and_override():
  config = _config()
  assert extract.decode_processes(config) == 0  # CPU: cores compute.
  config.extract = ml_collections.ConfigDict({"decode_processes": 3})
  assert extract.decode_processes(config) == 3


def test_table6_presets_name_each_pair():
  want = {
    "swin": ("swin", "swin3d"),
    "shufflenet": ("shufflenet", "shufflenet3d"),
    "resnet": ("resnet", "r2plus1d"),
  }
  for pair, kinds in want.items():
    c = divita.get_config(f"trailers12k,{pair}")
    assert (c.backbones.image.kind, c.backbones.video.kind) == kinds
    assert all(c.backbones[b].checkpoint for b in ("image", "video"))
    c = divita.get_config(pair)  # Synthetic: tiny random-init variants.
    assert (c.backbones.image.kind, c.backbones.video.kind) == kinds
    assert not c.backbones.image.checkpoint
  with pytest.raises(ValueError, match="one backbone pair"):
    divita.get_config("swin,resnet")


def test_light_pair_extracts_clip_features(tmp_path):
  # The ShuffleNet pair random-initialised: 2-D per frame (BatchNorm
  # statistics in the variables), 3-D per clip.
  config = divita.get_config("shufflenet")
  config.clips.frames_per_clip = 4
  clips = _clips(3)
  for branch, dim in (("image", 1024), ("video", 1024)):
    module, variables, spec = runtime.make_backbone(config, branch)
    assert "batch_stats" in variables and spec["feature_dim"] == dim
    fn = extract.FeatureFn(module, variables, spec, backbone.input_stats(spec))
    feats = fn(clips, batch_size=8)
    assert feats.shape == (3, dim) and np.all(np.isfinite(feats))
