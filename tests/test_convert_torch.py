"""`python -m divita_jax.convert` on PyTorch backbone files: written,
loaded by `load_backbone` and equal to the PyTorch model."""

import jax
import numpy as np
import pytest
import torch

from divita_jax.convert import __main__ as convert_cli
from divita_jax.convert import swin as convert_swin
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone
from divita_jax.references.torchvision_cpu import torchvision
from tests.test_convnets import randomise_bn
from tests.test_swin import TWO_2D, randomize, tv_model
from tests.test_swin import state_dict as swin_state_dict


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


def test_torchvision_drop_dont_load_and_normalization(tmp_path):
  """--drop discards source keys, --dont_load re-initialises params,
  --normalization sets the input convention: each visibly."""
  model = randomise_bn(torchvision().models.resnet18())
  path = tmp_path / "r18.pth"
  torch.save(model.state_dict(), path)
  args = [f"--input={path}", "--source=torchvision", "--arch=resnet18"]
  bn2 = r"--drop=layer4\.1\.bn2\..*"
  # Dropped and not re-initialised: the model misses the keys.
  with pytest.raises(SystemExit, match=r"missing keys \['layer4\.1\.bn2\."):
    convert_cli.main([*args, bn2, f"--output={tmp_path}/a"])
  with pytest.raises(SystemExit, match=r"--drop \['nothing'\] matches none"):
    convert_cli.main([*args, "--drop=nothing", f"--output={tmp_path}/b"])
  out = str(tmp_path / "out")
  convert_cli.main(
    [*args, bn2, r"--drop=fc\..*", "--dont_load=layer4_1/bn2/.*"]
    + ["--normalization=zero_one", "--resolution=64", f"--output={out}"]
  )
  _, variables, spec = backbone.load_backbone(out)
  assert spec["normalization"] == "zero_one" and spec["mean"] == [0, 0, 0]
  assert spec["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
  assert spec["source"]["drop"] == [r"layer4\.1\.bn2\..*", r"fc\..*"]
  p, stats = variables["params"], variables["batch_stats"]
  src = model.layer4[1]
  # Re-initialised as a fresh BatchNorm, unlike the (randomised) source.
  np.testing.assert_array_equal(p["layer4_1"]["bn2"]["scale"], 1.0)
  np.testing.assert_array_equal(stats["layer4_1"]["bn2"]["var"], 1.0)
  assert np.abs(src.bn2.weight.detach().numpy() - 1.0).min() > 0
  # Everything else is the source's.
  np.testing.assert_array_equal(
    p["layer4_1"]["bn1"]["scale"], src.bn1.weight.detach().numpy()
  )
  np.testing.assert_array_equal(
    stats["layer4_1"]["bn1"]["mean"], src.bn1.running_mean.numpy()
  )


def test_swin_dont_load_leaves_params_to_reinitialise():
  sd = swin_state_dict(tv_model(TWO_2D))
  no_norm = {k: v for k, v in sd.items() if not k.startswith("norm.")}
  with pytest.raises(ConversionError, match=r"missing keys \['norm/bias'"):
    convert_swin.from_torchvision(no_norm, "swin_t", TWO_2D)
  for source in (sd, no_norm):
    params, _, _ = convert_swin.from_torchvision(
      source, "swin_t", TWO_2D, dont_load=["norm/.*"]
    )
    assert "norm" not in params and "patch_norm" in params
