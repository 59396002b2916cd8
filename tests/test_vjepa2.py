"""V-JEPA 2 encoder: parity with transformers' VJEPA2Model, controls,
converter errors, the backbone contract, clip time resampling.

Tiny random models (torch.manual_seed), every weight redrawn (LayerNorm
scales near 1, others N(0, 0.3^2)): the default init (zero biases, unit
norms) would hide mapping errors.
"""

import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from divita_jax.convert import hf_vjepa2
from divita_jax.convert.__main__ import main as convert_main
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone, clip_time, vjepa2
from divita_jax.trainers import param_groups
from tests.parity import edit_hf_folder, rel_err, run

TOL = 1e-4
# head_dim 16: three rotary segments of 4 dims and 4 dims not rotated.
SMALL = dict(
  hidden_size=48,
  num_attention_heads=3,
  num_hidden_layers=2,
  mlp_ratio=2.0,
  crop_size=32,
  patch_size=8,
  frames_per_clip=4,
  pred_hidden_size=32,
  pred_num_attention_heads=2,
  pred_num_hidden_layers=1,
)
# A second size: head_dim 32 (segments of 10, 2 left), 3 x 2 patches.
OTHER = dict(SMALL, hidden_size=64, num_attention_heads=2, crop_size=48)
OTHER.update(patch_size=16, frames_per_clip=6, mlp_ratio=1.5)


def hf_model(cfg, seed=0):
  torch.manual_seed(seed)
  model = transformers.VJEPA2Model(transformers.VJEPA2Config(**cfg))
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = "norm" in name and name.endswith("weight")
      p.copy_(torch.randn(p.shape) * (0.1 if is_scale else 0.3) + is_scale)
  return model.eval()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(reference model, its HF folder, our converted folder)."""
  root = tmp_path_factory.mktemp("vjepa2")
  model = hf_model(SMALL)
  model.save_pretrained(root / "hf")
  hf_vjepa2.convert(str(root / "hf"), str(root / "ours"))
  return model, str(root / "hf"), str(root / "ours")


def clip(batch, frames, size, seed=0):
  rng = np.random.RandomState(seed)
  return rng.randn(batch, frames, size, size, 3).astype(np.float32)


def reference(model, x):
  """Last hidden states [B, N, D] of the encoder on NTHWC clips."""
  with torch.no_grad():
    tx = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy())  # NTCHW
    return model.get_vision_features(tx).numpy()


def test_parity_native_and_more_frames(small):
  model, _, ours = small
  module, variables, spec = backbone.load_backbone(ours)
  assert spec["num_frames"] == 4 and spec["resolution"] == 32
  for frames in (4, 8):  # native, and twice the clip (rotary extends)
    x = clip(2, frames, 32, seed=frames)
    want = reference(model, x)
    pooled, out = run(module, variables, x)
    assert out["encoded"].shape == want.shape
    assert rel_err(out["encoded"], want) < TOL, frames
    assert rel_err(pooled, want.mean(1)) < TOL, frames


def test_parity_second_size_from_cli(tmp_path):
  model = hf_model(OTHER, seed=1)
  model.save_pretrained(tmp_path / "hf")
  out_dir = str(tmp_path / "ours")
  argv = ["--source", "hf_vjepa2", "--input", str(tmp_path / "hf")]
  convert_main([*argv, "--output", out_dir, "--num_frames", "2"])
  module, variables, spec = backbone.load_backbone(out_dir)
  assert spec["num_frames"] == 2 and spec["preprocessing"]["num_frames"] == 6
  x = clip(1, 2, 48, seed=3)  # a non-native frame count (native 6)
  want = reference(model, x)
  pooled, out = run(module, variables, x)
  assert rel_err(out["encoded"], want) < TOL
  assert rel_err(pooled, want.mean(1)) < TOL


def test_negative_controls_fail(small):
  """Each must break parity: rotary height / width swapped, CLS-style
  pooling, the q/k/v head split transposed."""
  model, _, ours = small
  module, variables, _ = backbone.load_backbone(ours)
  x = clip(2, 4, 32, seed=5)
  want = reference(model, x)
  _, out = run(module.clone(rope_axes="twh"), variables, x)
  assert rel_err(out["encoded"], want) > 1e-2
  pooled, _ = run(module.clone(classifier="0"), variables, x)
  assert rel_err(pooled, want.mean(1)) > 1e-1
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/kernel"
  d, h, hd = flat[key].shape
  flat[key] = flat[key].reshape(d, hd, h).transpose(0, 2, 1)  # hd-major
  bad = {"params": traverse_util.unflatten_dict(flat, sep="/")}
  _, out = run(module, bad, x)
  assert rel_err(out["encoded"], want) > 1e-2


def test_converter_errors_name_the_key(small, tmp_path):
  _, hf, _ = small

  def extra(w):
    w["encoder.layer.0.attention.bogus.weight"] = np.zeros(3, np.float32)
    return w

  def missing(w):
    del w["encoder.layer.1.norm2.bias"]
    return w

  cases = [
    (dict(edit_weights=extra), r"unexpected keys.*attention\.bogus\.weight"),
    (dict(edit_weights=missing), r"missing keys.*encoderblock_1/LayerNorm_1"),
    (
      dict(edit_config=lambda c: c.update(model_type="vivit")),
      "model_type 'vivit'",
    ),
    (dict(edit_config=lambda c: c.update(qkv_bias=False)), "qkv_bias"),
    (dict(edit_config=lambda c: c.update(hidden_act="relu")), "hidden_act"),
  ]
  for i, (edits, pattern) in enumerate(cases):
    folder = edit_hf_folder(hf, tmp_path / f"hf{i}", **edits)
    with pytest.raises(ConversionError, match=pattern):
      hf_vjepa2.convert(folder, str(tmp_path / f"out{i}"))
    assert not os.path.exists(tmp_path / f"out{i}")  # nothing written
  with pytest.raises(ConversionError, match="not a multiple of tubelet"):
    hf_vjepa2.convert(hf, str(tmp_path / "odd"), num_frames=5)
  with pytest.raises(SystemExit, match="--dont_load does not apply"):
    convert_main(
      ["--source", "hf_vjepa2", "--input", hf, "--output", str(tmp_path)]
      + ["--dont_load", "embedding/.*"]
    )


def test_create_backbone_contract_and_layer_ids():
  module, variables, spec = backbone.create_backbone(
    "vjepa2", "tiny/8", resolution=16, num_frames=6
  )
  assert spec["normalization"] == "imagenet" and spec["feature_dim"] == 64
  assert not backbone.is_image_model(spec)
  pooled, out = run(module, variables, clip(2, 6, 16))
  assert pooled.shape == (2, 64) and out["encoded"].shape == (2, 3 * 4, 64)
  ids, num = param_groups.layer_ids(variables["params"])
  assert num == 2
  flat = traverse_util.flatten_dict(ids, sep="/")
  assert flat["embedding/kernel"] == 0
  assert flat["Transformer/encoderblock_0/LayerNorm_0/scale"] == 1
  assert flat["Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"] == 2
  assert flat["Transformer/encoder_norm/scale"] == 3
  axes = traverse_util.flatten_dict(backbone.logical_axes(module, spec))
  qk = axes[
    ("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_0")
    + ("query", "kernel")
  ]
  assert tuple(qk) == ("embed", "heads", "kv")
  remat = module.clone(remat="full")
  shapes = jax.eval_shape(remat.init, jax.random.key(0), clip(1, 6, 16))
  shapes = nn.meta.unbox(shapes)  # same tree with remat: names kept
  assert jax.tree.structure(shapes["params"]) == jax.tree.structure(
    backbone.abstract_variables(module, spec)["params"]
  )
  assert vjepa2.decode_variant("L/16")["width"] == 1024
  assert vjepa2.decode_variant("g/16")["num_heads"] == 22


def test_resample_time_rule():
  idx = clip_time.resample_time(24, 16)
  assert idx.dtype == np.int32 and len(idx) == 16
  assert idx[0] == 0 and idx[-1] == 23  # endpoints
  assert np.all(np.diff(idx) >= 1)  # monotone, no repeats when fewer
  up = clip_time.resample_time(24, 64)
  assert up[0] == 0 and up[-1] == 23 and np.all(np.diff(up) >= 0)
  assert len(set(up.tolist())) == 24  # every frame used, some repeated
  assert np.any(np.diff(up) == 0)
  np.testing.assert_array_equal(clip_time.resample_time(24, 24), range(24))
  np.testing.assert_array_equal(clip_time.resample_time(4, 3), [0, 2, 3])
  np.testing.assert_array_equal(clip_time.resample_time(24, 1), [0])
  with pytest.raises(ValueError, match=">= 1"):
    clip_time.resample_time(0, 4)


def test_spec_takes_the_folders_video_processor(small, tmp_path):
  _, hf, _ = small
  folder = shutil.copytree(hf, tmp_path / "hf")
  processor = transformers.VJEPA2VideoProcessor(
    crop_size=64, image_mean=[0.5] * 3, image_std=[0.25] * 3
  )
  processor.save_pretrained(folder)
  spec = hf_vjepa2.convert(str(folder), str(tmp_path / "ours"))
  pre = spec["preprocessing"]
  assert spec["resolution"] == 64 and spec["num_frames"] == 4
  assert (pre["resize"], pre["crop"], pre["interpolation"]) == (
    73,  # int(64 * 256 / 224): the short side before the centre crop
    64,
    "bilinear",
  )
  assert spec["mean"] == [0.5] * 3 and spec["std"] == [0.25] * 3
