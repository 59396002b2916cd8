"""Swin / Video Swin: parity with torchvision and HF, converter checks.

Random weights made adversarial (bias tables N(0, 1), random LayerNorm
affines and biases): default inits hide index and ordering bugs. Small
widths keep the file fast; the real swin_t / swin3d_t run once each.
"""

import functools
import json
import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from divita_jax.convert import swin as convert
from divita_jax.models import swin, swin_windows
from divita_jax.references.torchvision_cpu import torchvision

TOL = 1e-4
SMALL = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])
SMALL_2D = dict(swin.decode_variant("T"), **SMALL)
SMALL_3D = dict(swin.decode_variant("T", video=True), **SMALL)
# Two stages suffice for the negative controls (and compile faster).
TWO = dict(embed_dim=16, depths=[2, 2], num_heads=[1, 2])
TWO_2D = dict(SMALL_2D, **TWO)
TWO_3D = dict(SMALL_3D, **TWO)


def randomize(model, seed=0):
  """Bias tables N(0, 1); LayerNorm scale U(0.5, 1.5); biases N(0, .3);
  linear weights N(0, 1 / fan_in), not 0.02, so attention is not flat."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("relative_position_bias_table"):
        p.copy_(torch.randn(p.shape, generator=g))
      elif p.ndim == 2:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
      elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  return model.eval()


def tv_model(fields, seed=0):
  tv = torchvision()
  video = len(fields["patch"]) == 3
  cls = (
    tv.models.video.swin_transformer.SwinTransformer3d
    if video
    else tv.models.swin_transformer.SwinTransformer
  )
  model = cls(
    patch_size=list(fields["patch"]),
    embed_dim=fields["embed_dim"],
    depths=list(fields["depths"]),
    num_heads=list(fields["num_heads"]),
    window_size=list(fields["window"]),
    stochastic_depth_prob=0.0,
    num_classes=5,
  )
  return randomize(model, seed)


def state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def tv_features(model, x):
  """torchvision (pooled, [stage outputs]) for channels-last numpy x."""
  video = hasattr(model, "patch_embed")
  tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy())  # B C [T] H W
  stages = []
  with torch.no_grad():
    h = model.patch_embed(tx) if video else tx
    for i, layer in enumerate(model.features):
      h = layer(h)
      if i % 2 == (0 if video else 1):  # stages, not merges / the stem
        stages.append(h.numpy())
    pooled = model.norm(h).flatten(1, -2).mean(1).numpy()
  return pooled, stages


# XLA's backend optimisation level changes speed, not float semantics; at
# 0 these small models compile in about half the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _jitted(fields_json, video, fast=True):
  cls = swin.Swin3D if video else swin.Swin
  model = cls(**json.loads(fields_json))
  return jax.jit(
    lambda p, v: model.apply({"params": p}, v),
    compiler_options=FAST_COMPILE if fast else None,
  )


def flax_features(fields, params, x, fresh=False, fast=True):
  """Flax (pooled, [stage outputs]); fresh: retrace (monkeypatched code)."""
  video = len(fields["patch"]) == 3
  key = json.dumps(fields, sort_keys=True)
  jitted = _jitted.__wrapped__ if fresh else _jitted
  fn = jitted(key, video, fast)
  pooled, out = fn(params, jnp.asarray(x))
  n = len(fields["depths"])
  return np.asarray(pooled), [np.asarray(out[f"stage_{i}"]) for i in range(n)]


def max_diffs(ref, got):
  """[pooled diff, stage diffs...]; a shape mismatch counts as inf."""
  pairs = [(ref[0], got[0]), *zip(ref[1], got[1])]
  return [
    float(np.abs(a - b).max()) if a.shape == b.shape else np.inf
    for a, b in pairs
  ]


def clip(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def check_parity(arch, fields, shape, seed=0, fast=True):
  """fast=False: compiled as in production (once, for the 2-D 224 case)."""
  model = tv_model(fields, seed)
  params, fields, _ = convert.from_torchvision(state_dict(model), arch, fields)
  x = clip(shape, seed)
  got = flax_features(fields, params, x, fast=fast)
  diffs = max_diffs(tv_features(model, x), got)
  assert max(diffs) <= TOL, diffs
  return diffs


# ---------------------------------------------------------------------------
# Parity with torchvision.


@pytest.mark.parametrize(
  "shape",
  [(1, 224, 224, 3), (2, 230, 201, 3)],  # odd: pads windows and merges
  ids=["224", "230x201"],
)
def test_swin2d_parity(shape):
  check_parity("swin_t", SMALL_2D, shape, fast=shape[0] == 2)


@pytest.mark.parametrize(
  "frames,size",
  [(8, 112), (16, 112), (24, 112), (16, 224), (24, 224)],
)
def test_swin3d_parity(frames, size):
  """8: T window shrinks to 4 (sliced index); 16: no T shift; 24: T' 12
  padded to 16 at every stage; 112: last stage 4x4 shrinks the window."""
  check_parity("swin3d_t", SMALL_3D, (1, frames, size, size, 3))


def test_real_swin_t_and_swin3d_t_parity():
  """The real architectures (default fields, real key layout)."""
  tv = torchvision()
  for arch, model, shape in (
    ("swin_t", tv.models.swin_t(), (1, 112, 112, 3)),
    ("swin3d_t", tv.models.video.swin3d_t(), (1, 16, 64, 64, 3)),
  ):
    model = randomize(model)
    params, fields, pre = convert.from_torchvision(state_dict(model), arch)
    assert fields == swin.decode_variant("T", video=arch == "swin3d_t")
    assert pre["crop"] == 224 and pre["mean"] == convert.IMAGENET_MEAN
    x = clip(shape)
    ref = tv_features(model, x)
    diffs = max_diffs(ref, flax_features(fields, params, x))
    assert ref[0].shape == (1, 768) and max(diffs) <= TOL, (arch, diffs)


def test_hf_swin_parity(tmp_path):
  """transformers SwinModel folder (MS original layout) at 224 and 230."""
  torchvision()  # transformers imports torchvision: schemas first
  import transformers  # noqa: PLC0415

  config = transformers.SwinConfig(
    image_size=224, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4]
  )
  for size in (230, 224):
    # A fresh HF model per size: its layers keep a shrunk shift as state.
    model = randomize(transformers.SwinModel(config), seed=size)
    model.save_pretrained(tmp_path / str(size))
    params, fields, pre = convert.from_hf_swin(str(tmp_path / str(size)))
    assert pre["interpolation"] == "bicubic" and pre["crop"] == 224
    x = clip((1, size, size, 3))
    with torch.no_grad():
      ref = model(torch.from_numpy(np.moveaxis(x, -1, 1).copy()))
    pooled, _ = flax_features(fields, params, x)
    diff = np.abs(ref.pooler_output.numpy() - pooled).max()
    assert diff <= TOL, (size, diff)
  # Hub checkpoints: `swin.` prefix, pre-v5 names, a classifier and the
  # index buffers; they convert to the same params.
  sd = state_dict(model)
  old = {"swin." + _old_hf_name(k): v for k, v in sd.items()}
  old["classifier.weight"] = np.zeros((5, 128), np.float32)
  index = swin_windows.relative_position_index((7, 7))
  for k in list(old):
    if k.endswith("relative_position_bias_table"):
      old[k.replace("_bias_table", "_index")] = index
  got = convert.from_hf_state_dict(old, fields)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def _old_hf_name(key):
  for old, new in convert._HF_RENAMES:
    key = key.replace(new, old)
  return key


def test_inflated_2d_weights_on_static_clip_equal_2d():
  model = tv_model(SMALL_2D)
  params, fields, _ = convert.from_torchvision(
    state_dict(model), "swin_t", SMALL_2D
  )
  frame = clip((1, 224, 224, 3))
  pooled_2d, stages_2d = flax_features(fields, params, frame, fast=False)
  params_3d = convert.inflate_to_3d(params)
  static = np.repeat(frame[:, None], 16, axis=1)  # [1, 16, 224, 224, 3]
  pooled_3d, stages_3d = flax_features(SMALL_3D, params_3d, static)
  assert np.abs(pooled_3d - pooled_2d).max() <= TOL
  for s2, s3 in zip(stages_2d, stages_3d):
    assert np.abs(s3 - s2[:, None]).max() <= TOL


# ---------------------------------------------------------------------------
# Negative controls: each known pitfall must break parity.


_INDEX = swin_windows.relative_index_in_graph


def _transposed_index(window, vol):
  return _INDEX(window, vol).T


def _wrong_merge_order(x):
  """x0, x2, x1, x3 (W varies first): the classic reshape slip."""
  x = swin_windows.pad_to(x, (x.ndim - 3, x.ndim - 2), (2, 2))
  *lead, h, w, c = x.shape
  return (
    x.reshape(*lead, h // 2, 2, w // 2, 2, c)
    .swapaxes(-4, -3)
    .reshape(*lead, h // 2, w // 2, 4 * c)
  )


def _masked_padding(original):
  """Labels padded tokens apart, so real queries never attend to them."""

  def labels(grid, padded, window, shift):
    base = original(grid, padded, window, shift)
    is_pad = np.ones(padded, np.int32)
    is_pad[tuple(map(slice, grid))] = 0
    is_pad = swin_windows.partition(is_pad[None, ..., None], window)[0, :, :, 0]
    return 1000 * is_pad + (0 if base is None else base)

  return labels


@pytest.mark.parametrize("bug", ["index", "merge", "padding"])
def test_negative_controls_fail_parity(bug, monkeypatch):
  fields, shape, arch = (
    (TWO_3D, (1, 24, 56, 56, 3), "swin3d_t")  # T' 12 padded to 16
    if bug == "padding"
    else (TWO_2D, (1, 112, 112, 3), "swin_t")
  )
  model = tv_model(fields)
  params, _, _ = convert.from_torchvision(state_dict(model), arch, fields)
  if bug == "index":
    monkeypatch.setattr(swin, "relative_index_in_graph", _transposed_index)
  elif bug == "merge":
    monkeypatch.setattr(swin, "merge_patches", _wrong_merge_order)
  else:
    monkeypatch.setattr(
      swin, "window_labels", _masked_padding(swin_windows.window_labels)
    )
  x = clip(shape)
  diffs = max_diffs(
    tv_features(model, x), flax_features(fields, params, x, fresh=True)
  )
  assert max(diffs) > 100 * TOL, diffs


# ---------------------------------------------------------------------------
# Converter strictness and file reading.


@pytest.fixture(scope="module")
def small_sd():
  return state_dict(tv_model(SMALL_2D))


def _convert_error(sd, arch="swin_t", fields=SMALL_2D):
  with pytest.raises(ValueError) as e:
    convert.from_torchvision(sd, arch, fields)
  return str(e.value)


def test_converter_is_strict(small_sd):
  sd = dict(small_sd, **{"features.1.0.attn.extra": np.zeros(3)})
  assert "features.1.0.attn.extra" in _convert_error(sd)
  sd = {k: v for k, v in small_sd.items() if k != "features.3.1.norm2.bias"}
  assert "stage_1/block_1/norm2/bias" in _convert_error(sd)
  sd = dict(small_sd)
  sd["features.2.reduction.weight"] = np.zeros((32, 60), np.float32)
  assert "stage_0/downsample/reduction/kernel" in _convert_error(sd)
  sd = dict(small_sd)
  key = "features.5.1.attn.relative_position_index"
  sd[key] = sd[key].reshape(49, 49).T.reshape(-1)
  assert key in _convert_error(sd)
  assert "unexpected keys" in _convert_error(small_sd, "swin3d_t", None)
  # The classifier is dropped; nothing else is.
  assert any(k.startswith("head.") for k in small_sd)
  convert.from_torchvision(small_sd, "swin_t", SMALL_2D)


def test_read_torch_state_dict(tmp_path, small_sd):
  from safetensors.torch import save_file  # noqa: PLC0415

  tensors = {k: torch.from_numpy(v) for k, v in small_sd.items()}
  torch.save(tensors, tmp_path / "w.pth")
  save_file(tensors, str(tmp_path / "w.safetensors"))
  for name in ("w.pth", "w.safetensors"):
    got = convert.read_torch_state_dict(str(tmp_path / name))
    assert set(got) == set(small_sd)
    assert all(np.array_equal(got[k], small_sd[k]) for k in got)
  torch.save({"state_dict": tensors}, tmp_path / "ckpt.pth")
  got = convert.read_torch_state_dict(str(tmp_path / "ckpt.pth"))
  assert set(got) == set(small_sd)
  # weights_only: a pickled object (arbitrary code) is refused.
  torch.save({"w": tensors["norm.bias"], "evil": os.getcwd}, tmp_path / "x.pth")
  with pytest.raises(pickle.UnpicklingError):
    convert.read_torch_state_dict(str(tmp_path / "x.pth"))


@pytest.mark.parametrize("window", [(7, 7), (8, 7, 7)])
def test_in_graph_index_is_the_reference_index_sliced(window):
  full = swin_windows.relative_position_index(window)
  for vol in {full.shape[0], min(full.shape[0], 4 * 7 * 7), 16}:
    got = np.asarray(swin_windows.relative_index_in_graph(window, vol))
    np.testing.assert_array_equal(got, full[:vol, :vol])


def test_param_tree_and_logical_axes():
  model = swin.Swin3D(**SMALL_3D)
  tree = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 4, 32, 32, 3))
  )
  axes = jax.tree.leaves(nn.get_partition_spec(tree)["params"])
  assert len(axes) == len(jax.tree.leaves(tree["params"]))
  blk = tree["params"]["stage_0"]["block_1"]["attn"]
  assert blk["qkv"]["kernel"].value.shape == (16, 3, 1, 16)
  assert blk["relative_position_bias_table"].value.shape == (15 * 13 * 13, 1)
  assert "downsample" not in tree["params"]["stage_3"]
