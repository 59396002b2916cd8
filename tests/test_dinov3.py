"""DINOv3 ViT: parity with transformers (rotary, registers, gated MLP),
controls, converter errors, any grid, layer ids."""

import json

import jax
import numpy as np
import pytest
import transformers

from divita_jax.convert import hf_dinov3
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone
from divita_jax.trainers import param_groups
from tests.parity import rel_err, run
from tests.test_dinov2 import randomise, reference

TINY = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  patch_size=4,
  image_size=24,
  num_register_tokens=2,
)


def hf_folder(path, **kw):
  cfg = transformers.DINOv3ViTConfig(**{**TINY, **kw})
  model = randomise(transformers.DINOv3ViTModel(cfg))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  out = {}
  for name, kw in (
    ("plain", {}),
    ("gated", {"use_gated_mlp": True, "hidden_act": "silu"}),
  ):
    src = tmp_path_factory.mktemp(f"hf_{name}")
    model = hf_folder(src, **kw)
    dst = str(tmp_path_factory.mktemp(name) / "out")
    hf_dinov3.convert(str(src), dst)
    out[name] = (model, dst)
  return out


@pytest.mark.parametrize(
  "name,size", [("plain", 24), ("plain", 40), ("gated", 32)]
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
  """Rotary on swapped axes, registers dropped: must not match."""
  model, dst = converted["plain"]
  module, variables, _ = backbone.load_backbone(dst)
  x = np.random.RandomState(1).randn(1, 24, 24, 3).astype(np.float32)
  want = reference(model, x)[0]
  assert (
    rel_err(run(module.clone(rope_axes="wh"), variables, x)[0], want) > 1e-3
  )
  params = dict(variables["params"])
  params["Transformer"] = {
    k: v for k, v in params["Transformer"].items() if k != "register_embed"
  }
  no_reg = module.clone(num_registers=0)
  assert rel_err(run(no_reg, {"params": params}, x)[0], want) > 1e-3


def test_converter_errors(tmp_path):
  src = tmp_path / "src"
  hf_folder(src)
  from safetensors.numpy import load_file, save_file

  weights = load_file(str(src / "model.safetensors"))
  cfg = json.loads((src / "config.json").read_text())
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(cfg))
  save_file(
    {**weights, "layer.0.extra": np.ones(2, np.float32)},
    str(bad / "model.safetensors"),
  )
  with pytest.raises(ConversionError, match="layer.0.extra"):
    hf_dinov3.convert(str(bad), str(tmp_path / "o1"))
  save_file(
    {k: v for k, v in weights.items() if k != "norm.weight"},
    str(bad / "model.safetensors"),
  )
  with pytest.raises(ConversionError, match="encoder_norm/scale"):
    hf_dinov3.convert(str(bad), str(tmp_path / "o2"))
  save_file(weights, str(bad / "model.safetensors"))
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "dinov2"}))
  with pytest.raises(ConversionError, match="model_type"):
    hf_dinov3.convert(str(bad), str(tmp_path / "o3"))
  (bad / "config.json").write_text(json.dumps({**cfg, "mlp_bias": False}))
  with pytest.raises(ConversionError, match="mlp_bias"):
    hf_dinov3.convert(str(bad), str(tmp_path / "o4"))


def test_create_tiny_and_layer_ids():
  module, variables, spec = backbone.create_backbone(
    "dinov3", "tiny/8", resolution=32
  )
  pooled, out = run(module, variables, np.zeros((2, 32, 32, 3), np.float32))
  assert pooled.shape == (2, 64) and out["encoded"].shape == (2, 21, 64)
  assert backbone.is_image_model(spec)
  ids, num = param_groups.layer_ids(variables["params"])
  t = ids["Transformer"]
  assert num == 2 and t["register_embed"] == 0 and ids["cls"] == 0
  blocks = [t[f"encoderblock_{i}"]["LayerNorm_0"]["scale"] for i in range(2)]
  assert blocks == [1, 2] and t["encoder_norm"]["bias"] == 3
  big = jax.numpy.zeros((1, 48, 48, 3))
  assert run(module, variables, big)[1]["patches"].shape == (1, 36, 64)
