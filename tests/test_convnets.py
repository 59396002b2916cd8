"""ResNet, ShuffleNet-V2 (2-D/3-D) and R(2+1)D: parity with torchvision.

Random weights with re-randomised BatchNorm statistics and affine params
(default statistics would hide a dropped conversion). The 3-D ShuffleNet
has no installable reference: its layout is checked against the published
Efficient-3DCNNs names and shapes, and its numerics by inflation (2-D
torchvision kernels at the temporal centre: a static clip equals the
frame through the 2-D net). Negative controls show each check can fail.
"""

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from divita_jax.convert import convnets
from divita_jax.convert.tree import ConversionError
from divita_jax.models import r2plus1d, resnet, shufflenet
from divita_jax.references.shufflenet3d import inflate_layers, shuffle_any_rank
from divita_jax.references.torchvision_cpu import torchvision

TOL = 1e-4  # max abs diff of pooled features / max abs feature


def randomise_bn(model, seed=0):
  """Wide random BatchNorm statistics and affine params; eval mode."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      n = m.num_features
      m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
      m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
      m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
      m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
  return model.eval()


def state_dict(model):
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def torch_features(model, x_nchw):
  """Pooled features before the classifier."""
  head, model.fc = model.fc, torch.nn.Identity()
  with torch.inference_mode():
    out = model(torch.from_numpy(x_nchw)).numpy()
  model.fc = head
  return out


def flax_features(module, variables, x_nchw):
  x = jnp.asarray(np.moveaxis(x_nchw, 1, -1))  # channels-last
  return np.asarray(jax.jit(module.apply)(variables, x)[0])


def rel_err(ours, ref):
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def inputs(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def tv():
  torch.manual_seed(0)
  return torchvision()


@pytest.fixture(scope="module")
def small_resnet(tv):
  """torchvision Bottleneck ResNet, one block per stage (fast)."""
  bottleneck = tv.models.resnet.Bottleneck
  model = randomise_bn(tv.models.resnet.ResNet(bottleneck, [1, 1, 1, 1]))
  module = resnet.ResNet(depths=(1, 1, 1, 1))
  variables = convnets.convert(
    state_dict(model), module, 2, convnets.torchvision_name
  )
  return model, module, variables


@pytest.fixture(scope="module")
def shufflenet_x1(tv):
  model = randomise_bn(tv.models.shufflenet_v2_x1_0(), seed=1)
  variables, fields, _ = convnets.from_torchvision(
    state_dict(model), "shufflenet_v2_x1_0"
  )
  return model, shufflenet.ShuffleNetV2(**fields), variables


@pytest.fixture(scope="module")
def r2plus1d_18(tv):
  model = randomise_bn(tv.models.video.r2plus1d_18(), seed=2)
  variables, fields, prep = convnets.from_torchvision(
    state_dict(model), "r2plus1d_18"
  )
  assert prep["resolution"] == 112 and prep["std"][0] == 0.22803
  return model, r2plus1d.R2Plus1D(**fields), variables


# ---- Parity with torchvision ----


def test_resnet50_parity_224(tv):
  model = randomise_bn(tv.models.resnet50(), seed=3)
  variables, fields, prep = convnets.from_torchvision(
    state_dict(model), "resnet50"
  )
  assert fields == {"depths": (3, 4, 6, 3), "block": "bottleneck"}
  assert prep["crop"] == 224 and prep["resize"] == 256
  x = inputs(1, 3, 224, 224)
  ours = flax_features(resnet.ResNet(**fields), variables, x)
  assert ours.shape == (1, 2048)
  assert rel_err(ours, torch_features(model, x)) <= TOL


def test_small_resnet_parity_odd_size(small_resnet):
  model, module, variables = small_resnet
  x = inputs(2, 3, 97, 97)
  assert (
    rel_err(flax_features(module, variables, x), torch_features(model, x))
    <= TOL
  )


@pytest.mark.parametrize("size", [224, 161])
def test_shufflenet_x1_0_parity(shufflenet_x1, size):
  model, module, variables = shufflenet_x1
  x = inputs(2, 3, size, size)
  ours = flax_features(module, variables, x)
  assert ours.shape == (2, 1024)
  assert rel_err(ours, torch_features(model, x)) <= TOL


def test_shufflenet_x0_5_parity_odd_size(tv):
  model = randomise_bn(tv.models.shufflenet_v2_x0_5(), seed=4)
  variables, fields, _ = convnets.from_torchvision(
    state_dict(model), "shufflenet_v2_x0_5"
  )
  x = inputs(2, 3, 131, 131)
  ours = flax_features(shufflenet.ShuffleNetV2(**fields), variables, x)
  assert rel_err(ours, torch_features(model, x)) <= TOL


@pytest.mark.parametrize("frames", [8, 16, 24])
def test_r2plus1d_18_parity(r2plus1d_18, frames):
  model, module, variables = r2plus1d_18
  x = inputs(1, 3, frames, 112, 112)
  ours = flax_features(module, variables, x)
  assert ours.shape == (1, 512)
  assert rel_err(ours, torch_features(model, x)) <= TOL


# ---- 3-D ShuffleNet: Efficient-3DCNNs layout and inflation ----


def efficient3d_layout(width, classes=600):
  """Key -> shape of Efficient-3DCNNs `shufflenetv2.get_model(width_mult=
  width)` under nn.DataParallel, written from the published architecture:
  conv1 = 3x3x3 conv + BN; features.{i} = InvertedResidual (banch1 only on
  each stage's first block); conv_last = 1x1x1 conv + BN; classifier.1."""
  ch = shufflenet.EFFICIENT3D_WIDTHS[width]
  shapes = {}

  def conv(name, cout, cin, k):
    shapes[f"{name}.weight"] = (cout, cin, k, k, k)

  def bn(name, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.{leaf}"] = (c,)
    shapes[f"{name}.num_batches_tracked"] = ()

  conv("conv1.0", ch[0], 3, 3)
  bn("conv1.1", ch[0])
  i, cin = 0, ch[0]
  for repeats, cout in zip((4, 8, 4), ch[1:4]):
    b = cout // 2
    for j in range(repeats):
      p = f"features.{i}"
      if j == 0:
        conv(f"{p}.banch1.0", cin, 1, 3)
        bn(f"{p}.banch1.1", cin)
        conv(f"{p}.banch1.2", b, cin, 1)
        bn(f"{p}.banch1.3", b)
      conv(f"{p}.banch2.0", b, cin if j == 0 else b, 1)
      bn(f"{p}.banch2.1", b)
      conv(f"{p}.banch2.3", b, 1, 3)
      bn(f"{p}.banch2.4", b)
      conv(f"{p}.banch2.5", b, b, 1)
      bn(f"{p}.banch2.6", b)
      i, cin = i + 1, cout
  conv("conv_last.0", ch[4], cin, 1)
  bn("conv_last.1", ch[4])
  shapes["classifier.1.weight"] = (classes, ch[4])
  shapes["classifier.1.bias"] = (classes,)
  return {f"module.{k}": v for k, v in shapes.items()}


def param_count(params):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))


@pytest.mark.parametrize("width", [0.25, 0.5, 1.0, 1.5, 2.0])
def test_efficient3d_layout(width):
  layout = efficient3d_layout(width, classes=400 if width == 1.5 else 600)
  rng = np.random.default_rng(0)
  sd = {k: rng.normal(size=s).astype(np.float32) for k, s in layout.items()}
  variables, fields, prep = convnets.from_efficient3d(
    {"state_dict": sd, "arch": "shufflenetv2", "epoch": 1}, width
  )
  assert fields["dims"] == 3
  backbone = sum(
    int(np.prod(s))
    for k, s in layout.items()
    if "classifier" not in k and "running" not in k and "tracked" not in k
  )
  assert param_count(variables["params"]) == backbone
  if width == 1.0:
    assert backbone == 1_299_180  # Efficient-3DCNNs Table 8: 1.91M - head
  assert prep["std"] == [1 / 255] * 3
  assert np.allclose(np.array(prep["mean"]) * 255, (114.7748, 107.7354, 99.475))


def to_efficient3d(sd, classes=600):
  """torchvision ShuffleNet names -> the Efficient-3DCNNs layout; 2-D
  kernels inflated (each 3x3 at the temporal centre of a zero 3x3x3)."""
  out = {}
  for k, v in sd.items():
    if k.startswith("fc."):
      continue
    stage = k.split(".")[0]
    if stage.startswith("stage"):
      s, j = int(stage[5]), int(k.split(".")[1])
      first = {2: 0, 3: 4, 4: 12}[s]
      k = f"features.{first + j}." + k.split(".", 2)[2]
    k = k.replace("branch", "banch").replace("conv5.", "conv_last.")
    if v.ndim == 4:
      w = np.zeros((*v.shape[:2], v.shape[2], *v.shape[2:]), v.dtype)
      w[:, :, v.shape[2] // 2] = v  # [out, in, t, h, w], centre tap
      v = w
    out[f"module.{k}"] = v
  out["module.classifier.1.weight"] = np.zeros((classes, 1024), np.float32)
  out["module.classifier.1.bias"] = np.zeros((classes,), np.float32)
  return out


@pytest.fixture(scope="module")
def shufflenet_3d_inflated(shufflenet_x1):
  """The 2-D torchvision net and its inflation converted as Efficient-3D."""
  model = shufflenet_x1[0]
  sd3 = to_efficient3d(state_dict(model))
  assert {k: v.shape for k, v in sd3.items()} == efficient3d_layout(1.0)
  variables, fields, _ = convnets.from_efficient3d({"state_dict": sd3}, 1.0)
  return model, shufflenet.ShuffleNetV2(**fields), variables


@pytest.mark.parametrize("frames", [8, 16, 24])
def test_shufflenet_3d_inflation(shufflenet_3d_inflated, frames):
  model, module, variables = shufflenet_3d_inflated
  frame = inputs(1, 3, 112, 112, seed=frames)
  clip = np.repeat(frame[:, :, None], frames, axis=2)  # static clip
  ours = flax_features(module, variables, clip)
  assert rel_err(ours, torch_features(model, frame)) <= TOL


def test_shufflenet_3d_parity_moving_clip(tv, monkeypatch):
  """A torch 3-D ShuffleNet with Efficient-3DCNNs' strides (stem (1,2,2),
  pool and stage strides 2 in T), built from torchvision's blocks, against
  ours on a random clip: checks the temporal kernels and strides that a
  static clip cannot see."""
  monkeypatch.setattr(
    tv.models.shufflenetv2, "channel_shuffle", shuffle_any_rank
  )
  model = tv.models.shufflenet_v2_x0_5()
  inflate_layers(model)
  model.conv1[0].stride = (1, 2, 2)
  randomise_bn(model, seed=5)
  variables, fields, _ = convnets.from_efficient3d(
    to_efficient3d(state_dict(model)), 0.5
  )
  body = torch.nn.Sequential(
    model.conv1, model.maxpool, model.stage2, model.stage3, model.stage4,
    model.conv5,
  )  # fmt: skip
  clip = inputs(1, 3, 24, 64, 64)
  with torch.inference_mode():
    ref = body(torch.from_numpy(clip))  # [1, 1024, 2, 2, 2]
  module = shufflenet.ShuffleNetV2(**fields)
  ours = flax_features(module, variables, clip)
  assert tuple(ref.shape[2:]) == (2, 2, 2)  # T: 24 -> 12 -> 6 -> 3 -> 2
  assert rel_err(ours, ref.mean(dim=(2, 3, 4)).numpy()) <= TOL


# ---- Negative controls: each broken port fails parity ----


def test_dropped_batch_stats_fail(small_resnet):
  model, module, variables = small_resnet
  stats = jax.tree.map(jnp.ones_like, variables["batch_stats"])
  stats = jax.tree_util.tree_map_with_path(
    lambda p, v: v * 0 if p[-1].key == "mean" else v, stats
  )
  x = inputs(1, 3, 64, 64)
  ours = flax_features(module, {**variables, "batch_stats": stats}, x)
  assert rel_err(ours, torch_features(model, x)) > 100 * TOL


def same_pads(kernel, strides, padding):
  """Flax 'SAME' on even inputs: (0, 1) for a 3x3 stride-2 conv."""
  del padding
  total = [max(k - s, 0) for k, s in zip(kernel, strides)]
  return tuple((t // 2, t - t // 2) for t in total)


def test_same_padding_on_strided_conv_fails(small_resnet, monkeypatch):
  model, module, variables = small_resnet
  x = inputs(1, 3, 64, 64)  # even sizes: SAME gives torch's shapes
  assert (
    rel_err(flax_features(module, variables, x), torch_features(model, x))
    <= TOL
  )
  monkeypatch.setattr(resnet, "conv_pads", same_pads)
  ours = flax_features(module, variables, x)
  assert rel_err(ours, torch_features(model, x)) > 100 * TOL


def inverse_shuffle(x):
  """The inverse permutation: a (C/2, 2) view where torch has (2, C/2)."""
  *lead, c = x.shape
  return jnp.swapaxes(x.reshape(*lead, c // 2, 2), -1, -2).reshape(*lead, c)


def test_wrong_shuffle_order_fails(shufflenet_x1, monkeypatch):
  model, module, variables = shufflenet_x1
  monkeypatch.setattr(shufflenet, "channel_shuffle", inverse_shuffle)
  x = inputs(1, 3, 96, 96)
  ours = flax_features(module, variables, x)
  assert rel_err(ours, torch_features(model, x)) > 100 * TOL


class PerConvMidBlock(r2plus1d.Block):
  """Broken block: conv2's mid width from (planes, planes)."""

  @nn.compact
  def __call__(self, x):
    p, s, d = self.planes, self.stride, self.dtype
    y = nn.relu(
      r2plus1d.conv2plus1d(
        x, p, r2plus1d.mid_width(x.shape[-1], p), s, "conv1", d
      )
    )
    y = r2plus1d.conv2plus1d(y, p, r2plus1d.mid_width(p, p), 1, "conv2", d)
    if s != 1 or x.shape[-1] != p:
      x = resnet.conv_bn(
        x, p, 1, s, 0, names=("downsample_0", "downsample_1"), dtype=d,
        relu=False,
      )  # fmt: skip
    return nn.relu(x + y)


def test_mid_width_per_conv_fails(r2plus1d_18, monkeypatch):
  model, _, _ = r2plus1d_18
  monkeypatch.setattr(r2plus1d, "Block", PerConvMidBlock)
  with pytest.raises(ConversionError, match=r"layer2\.0\.conv2\.0\.0\.weight"):
    convnets.from_torchvision(state_dict(model), "r2plus1d_18")


# ---- Converter contract ----


def test_strict_keys(shufflenet_x1):
  model, _, _ = shufflenet_x1
  sd = state_dict(model)
  arch = "shufflenet_v2_x1_0"
  extra = {**sd, "stage2.0.branch1.9.weight": np.zeros(3, np.float32)}
  with pytest.raises(ConversionError, match=r"unexpected keys \['stage2"):
    convnets.from_torchvision(extra, arch)
  missing = {k: v for k, v in sd.items() if k != "conv5.1.running_var"}
  with pytest.raises(
    ConversionError, match="missing keys.*conv5.1.running_var"
  ):
    convnets.from_torchvision(missing, arch)
  with pytest.raises(
    ConversionError, match=r"shape mismatches.*conv5\.0\.weight"
  ):
    convnets.from_torchvision(sd, "shufflenet_v2_x0_5")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_read_state_dict(tv, suffix):
  model = tv.models.shufflenet_v2_x0_5()
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "w" + suffix)
    if suffix == ".pth":
      torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    else:
      import safetensors.torch  # noqa: PLC0415

      safetensors.torch.save_file(model.state_dict(), path)
    sd = convnets.read_state_dict(path)
  assert sd.keys() == model.state_dict().keys()
  assert sd["conv1.0.weight"].dtype == np.float32
  convnets.from_torchvision(sd, "shufflenet_v2_x0_5")


def test_bf16_and_logical_axes(small_resnet):
  _, module, variables = small_resnet
  x = jnp.asarray(inputs(1, 32, 32, 3))
  bf16 = module.clone(dtype=jnp.bfloat16)
  ours = jax.jit(bf16.apply)(variables, x)[0]
  ref = jax.jit(module.apply)(variables, x)[0]
  assert ours.dtype == jnp.float32
  assert rel_err(np.asarray(ours), np.asarray(ref)) < 5e-2
  boxed = jax.eval_shape(module.init, jax.random.key(0), x)
  axes = nn.get_partition_spec(boxed)["params"]
  assert tuple(axes["conv1"]["kernel"]) == (None, None, "embed", "mlp")
  assert tuple(axes["bn1"]["scale"]) == ("mlp",)
  params = nn.meta.unbox(boxed)["params"]
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
