"""VideoPrism encoder: parity with transformers' VideoPrismVisionModel,
controls, converter errors, the backbone contract.

Tiny random models (torch.manual_seed), every weight redrawn: the
reference initialises its LayerNorm weights to 0 (it computes with
1 + weight) and would hide a missing + 1. A small soft-cap (3) makes the
capping matter at these sizes; the second size keeps the default 50.
"""

import os

import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from divita_jax.convert import hf_videoprism
from divita_jax.convert.__main__ import main as convert_main
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone, videoprism
from divita_jax.trainers import param_groups
from tests.parity import edit_hf_folder, rel_err, run

TOL = 1e-4
SMALL = dict(
  hidden_size=32,
  num_attention_heads=4,
  intermediate_size=64,
  num_spatial_layers=2,
  num_temporal_layers=2,
  image_size=32,
  tubelet_size=[1, 8, 8],
  num_frames=4,
  attn_logit_softcapping=3.0,
)
OTHER = dict(SMALL, hidden_size=48, num_attention_heads=2, image_size=36)
OTHER.update(tubelet_size=[1, 12, 12], num_frames=3, num_temporal_layers=1)
OTHER.pop("attn_logit_softcapping")


def hf_model(cfg, seed=0):
  torch.manual_seed(seed)
  config = transformers.VideoPrismVisionConfig(**cfg)
  model = transformers.VideoPrismVisionModel(config)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape) * (0.5 if p.ndim > 1 else 0.2))
  return model.eval()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(reference model, its HF folder, our converted folder)."""
  root = tmp_path_factory.mktemp("videoprism")
  model = hf_model(SMALL)
  model.save_pretrained(root / "hf")
  hf_videoprism.convert(str(root / "hf"), str(root / "ours"))
  return model, str(root / "hf"), str(root / "ours")


def clip(batch, frames, size, seed=0):
  rng = np.random.RandomState(seed)
  return rng.rand(batch, frames, size, size, 3).astype(np.float32)


def reference(model, x):
  """Last hidden states [B, T hw, D] on NTHWC clips in [0, 1]."""
  with torch.no_grad():
    tx = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy())  # NTCHW
    out = model(tx, interpolate_pos_encoding=True)
    return out.last_hidden_state.numpy()


def test_parity_native_and_resized_tables(small):
  """Native size, then fewer frames and a smaller image: both tables
  downsampled with antialiasing, as interpolate_pos_encoding does."""
  model, _, ours = small
  for frames, size in ((4, 32), (3, 24)):
    module, variables, spec = backbone.load_backbone(
      ours, resolution=size, num_frames=frames
    )
    assert (spec["num_frames"], spec["resolution"]) == (frames, size)
    x = clip(2, frames, size, seed=frames)
    want = reference(model, x)
    pooled, out = run(module, variables, x)
    assert out["encoded"].shape == want.shape
    assert rel_err(out["encoded"], want) < TOL, (frames, size)
    assert rel_err(pooled, want.mean(1)) < TOL, (frames, size)


def test_parity_second_size_from_cli(tmp_path):
  """Default soft-cap 50, one temporal block, more frames (upsampled)."""
  model = hf_model(OTHER, seed=1)
  model.save_pretrained(tmp_path / "hf")
  out_dir = str(tmp_path / "ours")
  argv = ["--source", "hf_videoprism", "--input", str(tmp_path / "hf")]
  convert_main([*argv, "--output", out_dir, "--num_frames", "5"])
  module, variables, spec = backbone.load_backbone(out_dir)
  assert spec["num_frames"] == 5 and spec["model"]["native_frames"] == 3
  assert spec["normalization"] == "zero_one" and spec["model"]["softcap"] == 50
  x = clip(1, 5, 36, seed=3)
  want = reference(model, x)
  pooled, out = run(module, variables, x)
  assert rel_err(out["encoded"], want) < TOL
  assert rel_err(pooled, want.mean(1)) < TOL


def test_negative_controls_fail(small):
  """Each must break parity: no soft-cap, the temporal blocks skipped,
  the reference's 1 + weight LayerNorm scale left as weight."""
  model, _, ours = small
  module, variables, _ = backbone.load_backbone(ours)
  x = clip(2, 4, 32, seed=5)
  want = reference(model, x)
  for bad in (module.clone(softcap=None), module.clone(temporal_depth=0)):
    _, out = run(bad, variables, x)
    assert rel_err(out["encoded"], want) > 1e-2
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  for key in flat:
    if key.endswith("LayerNorm_0/scale"):
      flat[key] = flat[key] - 1.0
  bad = {"params": traverse_util.unflatten_dict(flat, sep="/")}
  _, out = run(module, bad, x)
  assert rel_err(out["encoded"], want) > 1e-2


def test_converter_errors_name_the_key(small, tmp_path):
  _, hf, _ = small

  def extra(w):
    w["temporal_layers.0.attention.rope.weight"] = np.zeros(3, np.float32)
    return w

  def missing(w):
    del w["temporal_layers.1.mlp.fc2.bias"]
    return w

  cases = [
    (dict(edit_weights=extra), r"unexpected keys.*attention\.rope\.weight"),
    (
      dict(edit_weights=missing),
      r"missing keys.*TemporalTransformer/encoderblock_3/MlpBlock_0",
    ),
    (
      dict(edit_config=lambda c: c.update(model_type="vjepa2")),
      "model_type 'vjepa2'",
    ),
    (
      dict(edit_config=lambda c: c.update(tubelet_size=[2, 8, 8])),
      "tubelet_size",
    ),
  ]
  for i, (edits, pattern) in enumerate(cases):
    folder = edit_hf_folder(hf, tmp_path / f"hf{i}", **edits)
    with pytest.raises(ConversionError, match=pattern):
      hf_videoprism.convert(folder, str(tmp_path / f"out{i}"))
    assert not os.path.exists(tmp_path / f"out{i}")  # nothing written


def test_create_backbone_contract_and_layer_ids():
  """Spatial blocks 0..1 then temporal blocks 2..3, in layer-id order."""
  module, variables, spec = backbone.create_backbone(
    "videoprism", "tiny/8", resolution=16, num_frames=3
  )
  assert spec["normalization"] == "zero_one" and spec["feature_dim"] == 64
  assert spec["model"]["native_frames"] == 3
  pooled, out = run(module, variables, clip(2, 3, 16))
  assert pooled.shape == (2, 64) and out["encoded"].shape == (2, 3 * 4, 64)
  ids, num = param_groups.layer_ids(variables["params"])
  assert num == 4
  flat = traverse_util.flatten_dict(ids, sep="/")
  blocks = {  # "SpatialTransformer/encoderblock_0" -> its layer id
    "/".join(k.split("/")[:2]): v for k, v in flat.items() if "block_" in k
  }
  assert blocks == {
    "SpatialTransformer/encoderblock_0": 1,
    "SpatialTransformer/encoderblock_1": 2,
    "TemporalTransformer/encoderblock_2": 3,
    "TemporalTransformer/encoderblock_3": 4,
  }
  assert flat["embedding/kernel"] == 0
  axes = traverse_util.flatten_dict(backbone.logical_axes(module, spec))
  out_kernel = axes[
    ("TemporalTransformer", "encoderblock_2", "MultiHeadDotProductAttention_0")
    + ("out", "kernel")
  ]
  assert tuple(out_kernel) == ("heads", "kv", "embed")
  assert videoprism.decode_variant("B/18")["temporal_depth"] == 4


def test_video_text_folder_gives_its_vision_encoder(tmp_path):
  """VideoPrismClipModel (LvT): text tower, auxiliary layers and pooling
  head left out; the encoder equals its vision model's own folder."""
  vision = {k: v for k, v in SMALL.items() if k != "attn_logit_softcapping"}
  text = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)
  config = transformers.VideoPrismConfig(
    vision_config=dict(vision, num_auxiliary_layers=1),
    text_config=dict(text, num_hidden_layers=1, vocab_size=50),
  )
  torch.manual_seed(0)
  model = transformers.VideoPrismClipModel(config)
  model.save_pretrained(tmp_path / "clip")
  model.video_model.vision_model.save_pretrained(tmp_path / "vision")
  trees = []
  for name in ("clip", "vision"):
    out = str(tmp_path / f"{name}_ours")
    spec = hf_videoprism.convert(str(tmp_path / name), out)
    _, variables, _ = backbone.load_backbone(out)
    trees.append(traverse_util.flatten_dict(variables["params"], sep="/"))
  assert spec["model"]["temporal_depth"] == 2
  assert trees[0].keys() == trees[1].keys()
  for key in trees[0]:
    np.testing.assert_array_equal(trees[0][key], trees[1][key], err_msg=key)
