"""DINOv2 (plain, SwiGLU, registers): parity with transformers, controls,
converter errors, resizing, layer ids."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from divita_jax.convert import hf_dinov2
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone, dinov2
from divita_jax.references import torchvision_cpu
from divita_jax.trainers import param_groups
from tests.parity import rel_err, run

torchvision_cpu.torchvision()

TINY = dict(
  hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4
)


def randomise(model, seed=0):
  """Every tensor random (norm scales near 1): zeros hide mapping bugs."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      near_one = "norm" in name and name.endswith("weight")
      p.copy_(torch.randn_like(p) * (0.1 if near_one else 0.3) + near_one)
  return model.eval()


def hf_folder(path, registers=False, **kw):
  cls, cfg = (
    (
      transformers.Dinov2WithRegistersModel,
      transformers.Dinov2WithRegistersConfig,
    )
    if registers
    else (transformers.Dinov2Model, transformers.Dinov2Config)
  )
  model = randomise(cls(cfg(**{**TINY, "image_size": 24, **kw})))
  model.save_pretrained(path)
  return model


def reference(model, x):
  with torch.inference_mode():
    o = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  return o.pooler_output.numpy(), o.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """{name: (torch model, converted dir)}: plain, SwiGLU, registers."""
  out = {}
  for name, kw in (
    ("plain", {}),
    ("swiglu", {"use_swiglu_ffn": True}),
    ("registers", {"registers": True, "num_register_tokens": 2}),
  ):
    src = tmp_path_factory.mktemp(f"hf_{name}")
    model = hf_folder(src, **kw)
    dst = str(tmp_path_factory.mktemp(name) / "out")
    hf_dinov2.convert(str(src), dst)
    out[name] = (model, dst)
  return out


# 24 px: the native 6 x 6 grid; 40 px: the table resized to 10 x 10.
@pytest.mark.parametrize(
  "name,size",
  [("plain", 24), ("plain", 40), ("swiglu", 40), ("registers", 40)],
)
def test_parity(converted, name, size):
  model, dst = converted[name]
  module, variables, spec = backbone.load_backbone(dst, resolution=size)
  assert spec["resolution"] == size
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  pooled, out = run(module, variables, x)
  want_pooled, want_tokens = reference(model, x)
  assert rel_err(pooled, want_pooled) < 1e-4
  assert rel_err(out["encoded"], want_tokens) < 1e-4


def test_controls_fail(converted):
  """LayerScale dropped, or the table resized bilinearly: must not match."""
  model, dst = converted["plain"]
  module, variables, _ = backbone.load_backbone(dst)
  x = np.random.RandomState(1).randn(1, 40, 40, 3).astype(np.float32)
  want = reference(model, x)[0]
  assert rel_err(run(module, variables, x)[0], want) < 1e-4
  params = jax.tree_util.tree_map_with_path(
    lambda p, v: jnp.ones_like(v) if "LayerScale" in str(p) else v,
    variables["params"],
  )
  assert rel_err(run(module, {"params": params}, x)[0], want) > 1e-2
  bilinear = module.clone(posemb_interpolation="bilinear")
  assert rel_err(run(bilinear, variables, x)[0], want) > 1e-3
  # Registers: the antialiased bicubic is what the reference uses there.
  model, dst = converted["registers"]
  module, variables, _ = backbone.load_backbone(dst)
  want = reference(model, x)[0]
  plain = module.clone(posemb_interpolation="bicubic")
  assert rel_err(run(plain, variables, x)[0], want) > 1e-4


def test_resize_matrix_matches_torch():
  g = torch.randn(1, 3, 7, 7)
  for n, method, kw in (
    (12, "bicubic", {}),
    (4, "bicubic", {}),
    (4, "bicubic_antialias", {"antialias": True}),
    (12, "bicubic_antialias", {"antialias": True}),
    (12, "bilinear", {}),
  ):
    mode = method.split("_")[0]
    want = torch.nn.functional.interpolate(
      g, size=(n, n), mode=mode, align_corners=False, **kw
    ).numpy()
    m = dinov2.resize_matrix(7, n, method)
    got = np.einsum("ih,bchw,jw->bcij", m, g.numpy(), m)
    assert np.abs(got - want).max() < 1e-5, method


def test_converter_errors(converted, tmp_path):
  _, dst = converted["plain"]
  src = tmp_path / "src"
  hf_folder(src)
  from safetensors.numpy import load_file, save_file

  weights = load_file(str(src / "model.safetensors"))
  bad = tmp_path / "unknown"
  bad.mkdir()
  (bad / "config.json").write_text((src / "config.json").read_text())
  save_file(
    {**weights, "extra.weight": np.ones(3, np.float32)},
    str(bad / "model.safetensors"),
  )
  with pytest.raises(ConversionError, match="extra.weight"):
    hf_dinov2.convert(str(bad), str(tmp_path / "o1"))
  missing = {k: v for k, v in weights.items() if "layer_scale2" not in k}
  save_file(missing, str(bad / "model.safetensors"))
  with pytest.raises(ConversionError, match="LayerScale_1"):
    hf_dinov2.convert(str(bad), str(tmp_path / "o2"))
  cfg = json.loads((src / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "vit"}))
  save_file(weights, str(bad / "model.safetensors"))
  with pytest.raises(ConversionError, match="model_type"):
    hf_dinov2.convert(str(bad), str(tmp_path / "o3"))
  cfg["hidden_act"] = "relu6"
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConversionError, match="hidden_act"):
    hf_dinov2.convert(str(bad), str(tmp_path / "o4"))
  assert not os.path.exists(tmp_path / "o1")


def test_spec_preprocessing_and_cli(tmp_path):
  src = tmp_path / "src"
  hf_folder(src)
  (src / "preprocessor_config.json").write_text(
    json.dumps(
      {
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 28, "width": 28},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.4, 0.4, 0.4],
        "image_std": [0.2, 0.2, 0.2],
      }
    )
  )
  from divita_jax.convert.__main__ import main

  main(
    [
      "--source",
      "hf_dinov2",
      "--input",
      str(src),
      "--output",
      str(tmp_path / "o"),
    ]
  )
  spec = backbone.read_spec(str(tmp_path / "o"))
  assert spec["kind"] == "dinov2" and spec["resolution"] == 28
  assert spec["preprocessing"]["resize"] == 32
  assert spec["mean"] == [0.4] * 3 and backbone.is_image_model(spec)


def test_create_tiny_and_layer_ids():
  module, variables, spec = backbone.create_backbone(
    "dinov2", "tiny", resolution=28
  )
  pooled, out = run(module, variables, np.zeros((2, 28, 28, 3), np.float32))
  assert pooled.shape == (2, 64) and out["encoded"].shape == (2, 5, 64)
  assert spec["feature_dim"] == 64 and spec["normalization"] == "imagenet"
  ids, num = param_groups.layer_ids(variables["params"])
  t = ids["Transformer"]
  assert num == 2 and ids["cls"] == 0 and ids["embedding"]["kernel"] == 0
  assert t["posembed_input"]["pos_embedding"] == 0
  assert t["encoderblock_0"]["LayerScale_0"]["scale"] == 1
  assert t["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"] == 2
  assert t["encoder_norm"]["scale"] == 3
  remat = module.clone(remat="full")
  assert (
    rel_err(
      run(remat, variables, np.ones((1, 28, 28, 3)))[0],
      np.asarray(run(module, variables, np.ones((1, 28, 28, 3)))[0]),
    )
    < 1e-6
  )
