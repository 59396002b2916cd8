"""`python -m divita_jax.convert` on PyTorch backbone files: written,
loaded by `load_backbone` and equal to the PyTorch model."""

import jax
import numpy as np
import torch

from divita_jax.convert import __main__ as convert_cli
from divita_jax.models import backbone
from tests.test_convnets import randomise_bn
from tests.test_swin import randomize
from tests.torch_reference import torchvision


def _convert_and_load(tmp_path, model, name, *args):
  path = tmp_path / name
  torch.save(model.state_dict(), path)
  out = str(tmp_path / "out")
  convert_cli.main([f"--input={path}", f"--output={out}", *args])
  return backbone.load_backbone(out)


def _torch_features(model, x_nhwc, tap):
  with torch.no_grad():
    return tap(model, torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2))).numpy()


def test_torchvision_swin_t_through_the_cli(tmp_path):
  tv = torchvision()
  model = randomize(tv.models.swin_t())
  module, variables, spec = _convert_and_load(
    tmp_path, model, "swin_t.pth", "--source=torchvision", "--arch=swin_t"
  )
  assert spec["kind"] == "swin" and spec["feature_dim"] == 768
  assert spec["preprocessing"]["interpolation"] == "bicubic"
  assert spec["mean"] == [0.485, 0.456, 0.406]
  x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
  got = jax.jit(module.apply)(variables, x)[0]
  tap = lambda m, t: m.flatten(m.avgpool(m.permute(m.norm(m.features(t)))))
  want = _torch_features(model, x, tap)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_torchvision_shufflenet_with_batch_stats_and_clip_frames(tmp_path):
  tv = torchvision()
  model = randomise_bn(tv.models.shufflenet_v2_x0_5())
  module, variables, spec = _convert_and_load(
    tmp_path,
    model,
    "shufflenet.pth",
    "--source=torchvision",
    "--arch=shufflenet_v2_x0_5",
    "--resolution=96",
  )
  assert set(variables) == {"params", "batch_stats"}
  assert spec["kind"] == "shufflenet" and spec["resolution"] == 96
  assert backbone.is_image_model(spec) and spec["num_frames"] == 1
  x = np.random.default_rng(1).normal(size=(2, 96, 96, 3)).astype(np.float32)
  got = jax.jit(module.apply)(variables, x)[0]
  tap = lambda m, t: m.conv5(
    m.stage4(m.stage3(m.stage2(m.maxpool(m.conv1(t)))))
  ).mean([2, 3])
  want = _torch_features(model, x, tap)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
