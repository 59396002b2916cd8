"""Backbones past the paper in a run: presets, checks, the clips' frames.

Parity of each module with its transformers class: test_siglip.py,
test_dinov2.py, test_dinov3.py, test_vjepa2.py, test_videoprism.py.
"""

import numpy as np
import pytest

from divita_jax import extract
from divita_jax.configs import checks
from divita_jax.configs import divita as divita_config
from divita_jax.models import backbone, clip_time, runtime


def test_presets_name_each_backbone_and_pass_the_checks():
  for name, (branch, kind, ckpt, res) in divita_config.SINGLE.items():
    c = divita_config.get_config(name)  # Synthetic: tiny random init.
    assert c.model.branches == (branch,)
    assert c.backbones[branch].kind == kind
    assert not c.backbones[branch].checkpoint
    checks.check(c, num_devices=1, num_processes=1)
    c = divita_config.get_config(f"trailers12k,{name}")
    assert c.backbones[branch].checkpoint == f"checkpoints/{ckpt}"
    assert c.backbones[branch].resolution == res
  c = divita_config.get_config("modern")
  kinds = (c.backbones.image.kind, c.backbones.video.kind)
  assert kinds == ("siglip", "videoprism")
  assert c.model.branches == ("image", "video")
  checks.check(c, num_devices=1, num_processes=1)
  assert divita_config.get_config(
    "trailers12k,modern"
  ).backbones.video.checkpoint
  with pytest.raises(ValueError, match="one backbone pair"):
    divita_config.get_config("siglip,vjepa2")


def test_checks_name_a_resolution_off_the_patch_grid():
  c = divita_config.get_config("dinov2")
  c.backbones.image.resolution = 30  # tiny/8: patch 8.
  with pytest.raises(checks.ConfigError, match="backbones.image.resolution"):
    checks.check(c, num_devices=1, num_processes=1)


def test_clip_checkpoint_sees_its_own_frame_count(tmp_path):
  # A converted clip model keeps spec.json's frames; 8-frame clips are
  # resampled in time to its 4 (clip_time.resample_time: 0, 2, 5, 7).
  _, variables, spec = backbone.create_backbone(
    "vjepa2", "tiny/8", resolution=16, num_frames=4
  )
  backbone.save_backbone(str(tmp_path / "v"), variables, spec)
  c = divita_config.get_config("vjepa2")
  c.clips.frames_per_clip = 8
  c.backbones.video.checkpoint = str(tmp_path / "v")
  c.backbones.video.resolution = 16
  module, variables, spec = runtime.make_backbone(c, "video")
  assert spec["num_frames"] == 4
  np.testing.assert_array_equal(clip_time.resample_time(8, 4), [0, 2, 5, 7])
  clips = np.random.default_rng(0).integers(0, 256, (3, 8, 16, 16, 3))
  clips = clips.astype(np.uint8)
  feats = extract.branch_feature_fn(c, "video")(clips, batch_size=4)
  stats = backbone.input_stats(spec)

  def features(frames):
    x = runtime.normalize(clips[:, frames], *stats)
    return np.asarray(module.apply(variables, x)[0])

  np.testing.assert_allclose(feats, features([0, 2, 5, 7]), atol=1e-5)
  assert np.abs(feats - features([0, 1, 2, 3])).max() > 1e-3  # Control.
