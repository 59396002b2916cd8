"""ViViT: parameter trees, 2-D -> 3-D inflation, temporal resampling."""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from divita_jax.models import backbone, surgery, vit, vivit


def _count(module, x):
  tree = jax.eval_shape(module.init, jax.random.key(0), x)
  flat = traverse_util.flatten_dict(
    flax.linen.meta.unbox(tree)["params"], sep="/"
  )
  return flat, sum(math.prod(s.shape) for s in flat.values())


def test_b16x2_trees_match_scenic():
  fields = vit.decode_variant("B/16x2")
  x = jnp.zeros((1, 32, 224, 224, 3))
  flat, total = _count(vivit.ViViT(**fields, num_classes=400), x)
  assert flat["embedding/kernel"].shape == (2, 16, 16, 3, 768)
  assert flat["Transformer/posembed_input/pos_embedding"].shape == (
    1,
    3137,
    768,
  )
  assert total == 88_954_000  # Scenic Model 1, K400 head.
  fe = vivit.ViViT(
    **fields, num_classes=400, model_type="factorized_encoder", temporal_depth=4
  )
  flat, total = _count(fe, x)
  assert flat["cls_TemporalTransformer"].shape == (1, 1, 768)
  assert flat["SpatialTransformer/posembed_input/pos_embedding"].shape == (
    1,
    197,
    768,
  )
  assert flat["TemporalTransformer/posembed_input/pos_embedding"].shape == (
    1,
    17,
    768,
  )
  assert "TemporalTransformer/encoderblock_3/LayerNorm_0/scale" in flat
  assert total == 115_062_928  # Scenic Model 2, temporal depth 4.


def _random_params(module, x, seed=0):
  """Random values for every parameter (no init compile: tests stay fast)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.RandomState(seed)
  return jax.tree.map(
    lambda a: rng.randn(*a.shape).astype(np.float32) * 0.3,
    flax.linen.meta.unbox(shapes)["params"],
  )


@functools.cache
def _gap_vit():
  module = vit.ViT(**vit.decode_variant("tiny/8"), classifier="gap")
  return module, _random_params(module, jnp.zeros((1, 16, 16, 3)))


def test_inflated_gap_vivit_on_static_video_equals_vit():
  vit_module, vit_params = _gap_vit()
  names = ("width", "depth", "mlp_dim", "num_heads", "patch_size")
  fields = {f: getattr(vit_module, f) for f in names}
  module = vivit.ViViT(**fields, tubelet=2, classifier="gap")
  video = jnp.zeros((1, 6, 16, 16, 3))
  target = _random_params(module, video, 1)
  frame = np.random.RandomState(1).randn(2, 16, 16, 3).astype(np.float32)
  static = np.repeat(frame[:, None], 6, axis=1)  # [2, 6, 16, 16, 3]
  want, wout = jax.jit(vit_module.apply)({"params": vit_params}, frame)
  apply = jax.jit(module.apply)
  for kernel_init in ("average", "central"):
    params = surgery.vit_to_vivit(
      vit_params,
      target,
      vit_grid=(2, 2),
      vivit_grid=(3, 2, 2),
      kernel_init=kernel_init,
    )
    got, gout = apply({"params": params}, static)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=kernel_init)
    # Token order is time outermost: each time step repeats the ViT tokens.
    np.testing.assert_allclose(
      gout["encoded"], np.tile(wout["encoded"], (1, 3, 1)), atol=1e-5
    )
  # A moving video must differ (the invariant is not trivially true).
  moving = static * np.linspace(0.5, 1.5, 6)[None, :, None, None, None]
  other, _ = apply({"params": params}, moving)
  assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-3


def test_inflation_kernels():
  k = np.random.RandomState(0).randn(4, 4, 3, 8).astype(np.float32)
  central = surgery.inflate_kernel(k, 2, "central")
  np.testing.assert_array_equal(central[1], k)
  np.testing.assert_array_equal(central[0], 0.0)
  avg = surgery.inflate_kernel(k, 4, "average")
  np.testing.assert_allclose(avg.sum(0), k, atol=1e-6)
  with pytest.raises(ValueError, match="Unknown kernel init"):
    surgery.inflate_kernel(k, 2, "random")


def test_factorized_encoder_from_vit_and_temporal_resampling(tmp_path):
  vit_module, vit_params = _gap_vit()
  module = vivit.ViViT(
    width=64,
    depth=2,
    mlp_dim=128,
    num_heads=4,
    patch_size=8,
    tubelet=2,
    classifier="token",
    model_type="factorized_encoder",
    temporal_depth=1,
  )
  target = _random_params(module, jnp.zeros((1, 4, 24, 24, 3)), 2)
  params = surgery.vit_to_vivit(
    vit_params, target, vit_grid=(2, 2), vivit_grid=(2, 3, 3)
  )
  pe = params["SpatialTransformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 10, 64)  # class slot kept from the target init
  np.testing.assert_array_equal(
    params["SpatialTransformer"]["encoderblock_1"]["LayerNorm_0"]["scale"],
    vit_params["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"],
  )
  spec = backbone.make_spec(
    "vivit",
    {
      f: getattr(module, f)
      for f in (
        "width",
        "depth",
        "mlp_dim",
        "num_heads",
        "patch_size",
        "tubelet",
        "classifier",
        "model_type",
        "temporal_depth",
      )
    },
    variant=None,
    normalization="minus_one_one",
    resolution=24,
    num_frames=4,
  )
  backbone.save_backbone(str(tmp_path / "fe"), params, spec)
  m2, p2, s2 = backbone.load_backbone(str(tmp_path / "fe"), num_frames=8)
  p2 = p2["params"]
  tpe = p2["TemporalTransformer"]["posembed_input"]["pos_embedding"]
  old = params["TemporalTransformer"]["posembed_input"]["pos_embedding"]
  assert tpe.shape == (1, 5, 64) and s2["num_frames"] == 8
  np.testing.assert_array_equal(tpe[:, :2], old[:, :2])  # cls, first, ...
  np.testing.assert_allclose(tpe[:, 4], old[:, 2], atol=1e-6)  # ... last
  np.testing.assert_allclose(
    tpe[:, 2], (2 * old[:, 1] + old[:, 2]) / 3, atol=1e-6
  )
  feats, out = jax.jit(m2.apply)({"params": p2}, jnp.ones((2, 8, 24, 24, 3)))
  assert feats.shape == (2, 64) and out["encoded"].shape == (2, 5, 64)
  assert out["spatial_encoded"].shape == (2, 4, 10, 64)


def test_create_vivit_contract():
  module, params, spec = backbone.create_backbone(
    "vivit", "tiny/8", resolution=16, num_frames=4, tubelet=2
  )
  params = params["params"]
  assert spec["num_frames"] == 4 and spec["model"]["tubelet"] == 2
  feats, out = jax.jit(module.apply)(
    {"params": params}, jnp.ones((3, 4, 16, 16, 3))
  )
  assert feats.shape == (3, 64) and out["encoded"].shape == (3, 9, 64)
  assert out["stem"].shape == (3, 2, 2, 2, 64)
  with pytest.raises(ValueError, match="not a multiple of the tubelet 2"):
    backbone.create_backbone("vivit", "B/16x2", resolution=224, num_frames=3)
  with pytest.raises(ValueError, match="not a multiple of tubelet"):
    module.apply({"params": params}, jnp.ones((1, 3, 16, 16, 3)))
