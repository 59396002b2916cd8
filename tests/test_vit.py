"""ViT: parameter tree, contract of create/load, posemb resampling."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from divita_jax.models import backbone, runtime, surgery, vit


def _shapes(module, x):
  tree = jax.eval_shape(module.init, jax.random.key(0), x)
  return traverse_util.flatten_dict(
    flax.linen.meta.unbox(tree)["params"], sep="/"
  )


def test_b16_tree_matches_scenic():
  module = vit.ViT(**vit.decode_variant("B/16"), num_classes=1000)
  shapes = _shapes(module, jnp.zeros((1, 224, 224, 3)))
  blk = "Transformer/encoderblock_11/"
  want = {
    "embedding/kernel": (16, 16, 3, 768),
    "cls": (1, 1, 768),
    "Transformer/posembed_input/pos_embedding": (1, 197, 768),
    blk + "MultiHeadDotProductAttention_0/query/kernel": (768, 12, 64),
    blk + "MultiHeadDotProductAttention_0/value/bias": (12, 64),
    blk + "MultiHeadDotProductAttention_0/out/kernel": (12, 64, 768),
    blk + "MlpBlock_0/Dense_0/kernel": (768, 3072),
    blk + "LayerNorm_1/scale": (768,),
    "Transformer/encoder_norm/bias": (768,),
    "output_projection/kernel": (768, 1000),
  }
  for k, shape in want.items():
    assert shapes[k].shape == shape, k
  assert "Transformer/encoderblock_12/LayerNorm_0/scale" not in shapes
  total = sum(math.prod(s.shape) for s in shapes.values())
  assert total == 86_567_656  # Scenic ViT-B/16, token, 1000 classes.
  rep = module.clone(representation_size=768)
  total = sum(
    math.prod(s.shape)
    for s in _shapes(rep, jnp.zeros((1, 224, 224, 3))).values()
  )
  assert total == 87_158_248


def test_variants():
  for name, width in (
    ("Ti/16", 192),
    ("S/16", 384),
    ("L/16", 1024),
    ("H/14", 1280),
    ("tiny/8", 64),
  ):
    v = vit.decode_variant(name)
    assert v["width"] == width and v["patch_size"] == int(name[-2:].strip("/"))
  assert vit.decode_variant("B/16x2")["tubelet"] == 2
  with pytest.raises(ValueError, match="Unknown backbone variant 'X/16'"):
    vit.decode_variant("X/16")
  with pytest.raises(ValueError, match="must not name a tubelet"):
    backbone.create_backbone("vit", "B/16x2", resolution=224)
  with pytest.raises(ValueError, match="not a multiple of patch"):
    backbone.create_backbone("vit", "tiny/8", resolution=30)


def test_logical_axes():
  fields = vit.decode_variant("tiny/8")
  spec = backbone.make_spec(
    "vit",
    fields,
    variant="tiny/8",
    resolution=16,
    num_frames=1,
    normalization="zero_one",
  )
  axes = backbone.logical_axes(backbone.module_from_spec(spec), spec)
  blk = axes["Transformer"]["encoderblock_0"]
  att = blk["MultiHeadDotProductAttention_0"]
  assert tuple(att["query"]["kernel"]) == ("embed", "heads", "kv")
  assert tuple(att["out"]["kernel"]) == ("heads", "kv", "embed")
  assert tuple(blk["MlpBlock_0"]["Dense_0"]["kernel"]) == ("embed", "mlp")
  assert tuple(blk["LayerNorm_0"]["scale"]) == ("embed",)


def test_create_backbone_contract():
  module, params, spec = backbone.create_backbone(
    "vit", "tiny/8", resolution=32, seed=3
  )
  params = params["params"]
  assert spec["kind"] == "vit" and spec["feature_dim"] == 64
  assert spec["normalization"] == "minus_one_one"
  assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params))
  frames = np.random.RandomState(0).randint(0, 256, (6, 32, 32, 3))
  x = runtime.normalize(frames.astype(np.uint8), *backbone.input_stats(spec))
  assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
  apply = jax.jit(module.apply)
  feats, out = apply({"params": params}, x)
  assert feats.shape == (6, 64) and out["encoded"].shape == (6, 17, 64)
  np.testing.assert_array_equal(feats, out["encoded"][:, 0])
  # A frame's features do not depend on the other frames of its batch.
  shuffled, _ = apply({"params": params}, x[::-1])
  np.testing.assert_allclose(shuffled[::-1], feats, atol=1e-5)
  alone, _ = apply({"params": params}, x[2:3])
  np.testing.assert_allclose(alone[0], feats[2], atol=1e-5)
  bf16 = backbone.module_from_spec(spec, "bfloat16")
  fb, _ = jax.jit(bf16.apply)({"params": params}, x)
  assert fb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(fb, np.float32), feats, atol=0.1)
  gap = module.clone(classifier="gap")  # Same tree minus cls and its slot.
  gparams = {k: v for k, v in params.items() if k != "cls"}
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  gparams["Transformer"] = dict(
    params["Transformer"], posembed_input={"pos_embedding": pe[:, 1:]}
  )
  feats, out = jax.jit(gap.apply)({"params": gparams}, x)
  np.testing.assert_allclose(feats, out["encoded"].mean(1), atol=1e-6)


def test_resample_posemb_is_linear_interpolation():
  # A posemb linear in (row, col) is reproduced exactly by linear zoom with
  # aligned corners; the class entry is kept.
  rows, cols = np.meshgrid(
    np.linspace(0, 1, 3), np.linspace(0, 1, 3), indexing="ij"
  )
  grid = np.stack([rows, cols, rows + 2 * cols], -1).reshape(1, 9, 3)
  pe = np.concatenate([np.full((1, 1, 3), 7.0), grid], 1).astype(np.float32)
  new = surgery.resample_posemb(pe, (3, 3), (5, 5), num_prefix=1)
  r5, c5 = np.meshgrid(
    np.linspace(0, 1, 5), np.linspace(0, 1, 5), indexing="ij"
  )
  want = np.stack([r5, c5, r5 + 2 * c5], -1).reshape(1, 25, 3)
  np.testing.assert_allclose(new[:, 1:], want, atol=1e-6)
  np.testing.assert_array_equal(new[:, :1], 7.0)
  same = surgery.resample_posemb(pe, (3, 3), (3, 3), num_prefix=1)
  np.testing.assert_array_equal(same, pe)
  with pytest.raises(ValueError, match="prefix tokens"):
    surgery.resample_posemb(pe, (4, 4), (5, 5), num_prefix=1)


def test_load_backbone_resolution(tmp_path):
  module, params, spec = backbone.create_backbone(
    "vit", "tiny/8", resolution=24
  )
  params = params["params"]
  backbone.save_backbone(str(tmp_path / "ckpt"), params, spec)
  m2, p2, s2 = backbone.load_backbone(str(tmp_path / "ckpt"), resolution=40)
  p2 = p2["params"]
  assert s2["resolution"] == 40
  pe = p2["Transformer"]["posembed_input"]["pos_embedding"]
  want = surgery.resample_posemb(
    params["Transformer"]["posembed_input"]["pos_embedding"], (3, 3), (5, 5), 1
  )
  np.testing.assert_allclose(pe, want, atol=1e-6)
  feats, out = jax.jit(m2.apply)({"params": p2}, jnp.ones((2, 40, 40, 3)))
  assert out["encoded"].shape == (2, 26, 64)
  with pytest.raises(flax.errors.ScopeParamShapeError, match="pos_embedding"):
    m2.apply({"params": params}, jnp.ones((1, 40, 40, 3)))
  with pytest.raises(FileNotFoundError, match="not a converted backbone"):
    backbone.load_backbone(str(tmp_path))
  with pytest.raises(FileExistsError, match="exists"):
    backbone.save_backbone(str(tmp_path / "ckpt"), params, spec)
