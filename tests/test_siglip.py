"""SigLIP vision tower: parity with transformers (MAP-head pooled output,
bicubic table resize), controls, converter errors, layer ids."""

import json

import numpy as np
import pytest
import torch
import transformers

from divita_jax.convert import hf_siglip
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone
from divita_jax.trainers import param_groups
from tests.parity import rel_err, run
from tests.test_dinov2 import randomise

VISION = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=24,
  patch_size=4,
)


def reference(model, x, interpolate):
  with torch.inference_mode():
    o = model(
      torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
      interpolate_pos_encoding=interpolate,
    )
  return o.pooler_output.numpy(), o.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A SiglipVisionModel folder and a whole SiglipModel folder."""
  src = tmp_path_factory.mktemp("hf_vision")
  vision = transformers.SiglipVisionModel(
    transformers.SiglipVisionConfig(**VISION)
  )
  randomise(vision).save_pretrained(src)
  dst = str(tmp_path_factory.mktemp("vision") / "out")
  hf_siglip.convert(str(src), dst)
  full_src = tmp_path_factory.mktemp("hf_full")
  text = dict(VISION, vocab_size=50, max_position_embeddings=8)
  text = {
    k: v for k, v in text.items() if "image" not in k and "patch" not in k
  }
  full = transformers.SiglipModel(
    transformers.SiglipConfig(vision_config=VISION, text_config=text)
  )
  randomise(full, seed=1).save_pretrained(full_src)
  full_dst = str(tmp_path_factory.mktemp("full") / "out")
  hf_siglip.convert(str(full_src), full_dst)
  return {
    "vision": (vision, dst, src),
    "full": (full.vision_model.eval(), full_dst, full_src),
  }


@pytest.mark.parametrize(
  "name,size", [("vision", 24), ("vision", 40), ("full", 32)]
)
def test_parity(converted, name, size):
  model, dst, _ = converted[name]
  module, variables, spec = backbone.load_backbone(dst, resolution=size)
  assert spec["resolution"] == size and spec["normalization"] == "custom"
  assert spec["mean"] == [0.5] * 3 and spec["std"] == [0.5] * 3
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  pooled, out = run(module, variables, x)
  want_pooled, want_tokens = reference(model, x, size != 24)
  assert rel_err(pooled, want_pooled) < 1e-4
  assert rel_err(out["encoded"], want_tokens) < 1e-4


def test_controls_fail(converted):
  """Mean or first-token pooling instead of the attention pool; the
  table resized bilinearly: must not match."""
  model, dst, _ = converted["vision"]
  module, variables, _ = backbone.load_backbone(dst)
  x = np.random.RandomState(1).randn(1, 24, 24, 3).astype(np.float32)
  want = reference(model, x, False)[0]
  for pool in ("mean", "token"):
    params = {
      "params": {
        k: v for k, v in variables["params"].items() if k != "MAPHead_0"
      }
    }
    got = run(module.clone(pool=pool), params, x)[0]
    assert rel_err(got, want) > 1e-2, pool
  x = np.random.RandomState(2).randn(1, 40, 40, 3).astype(np.float32)
  want = reference(model, x, True)[0]
  assert rel_err(run(module, variables, x)[0], want) < 1e-4
  probe = dict(variables["params"]["MAPHead_0"])
  probe["probe"] = probe["probe"] * 0.5  # the probe must matter
  params = {"params": {**variables["params"], "MAPHead_0": probe}}
  assert rel_err(run(module, params, x)[0], want) > 1e-3


def test_converter_errors(converted, tmp_path):
  _, _, src = converted["vision"]
  from safetensors.numpy import load_file, save_file

  weights = load_file(str(src / "model.safetensors"))
  cfg = json.loads((src / "config.json").read_text())
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(cfg))
  save_file(
    {**weights, "head.extra": np.ones(2, np.float32)},
    str(bad / "model.safetensors"),
  )
  with pytest.raises(ConversionError, match="head.extra"):
    hf_siglip.convert(str(bad), str(tmp_path / "o1"))
  save_file(
    {k: v for k, v in weights.items() if k != "head.probe"},
    str(bad / "model.safetensors"),
  )
  with pytest.raises(ConversionError, match="MAPHead_0/probe"):
    hf_siglip.convert(str(bad), str(tmp_path / "o2"))
  save_file(weights, str(bad / "model.safetensors"))
  for model_type, match in (
    ("dinov2", "model_type"),
    ("siglip2_vision_model", "NaFlex"),
  ):
    (bad / "config.json").write_text(
      json.dumps({**cfg, "model_type": model_type})
    )
    with pytest.raises(ConversionError, match=match):
      hf_siglip.convert(str(bad), str(tmp_path / "o3"))
  (bad / "config.json").write_text(
    json.dumps({**cfg, "vision_use_head": False})
  )
  with pytest.raises(ConversionError, match="vision_use_head"):
    hf_siglip.convert(str(bad), str(tmp_path / "o4"))


def test_create_tiny_and_layer_ids():
  module, variables, spec = backbone.create_backbone(
    "siglip", "tiny/8", resolution=32
  )
  assert spec["normalization"] == "minus_one_one"
  pooled, out = run(module, variables, np.zeros((2, 32, 32, 3), np.float32))
  assert pooled.shape == (2, 64) and out["encoded"].shape == (2, 16, 64)
  ids, num = param_groups.layer_ids(variables["params"])
  t = ids["Transformer"]
  assert num == 2 and ids["embedding"]["kernel"] == 0
  assert t["posembed_input"]["pos_embedding"] == 0
  blocks = [t[f"encoderblock_{i}"]["LayerNorm_1"]["scale"] for i in range(2)]
  assert blocks == [1, 2] and ids["MAPHead_0"]["probe"] == 3
