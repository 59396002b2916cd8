"""AST: parity with transformers' ASTModel, converter checks.

Random weights made adversarial (weights N(0, 1 / fan_in), LayerNorm
scales U(0.5, 1.5), biases, tokens and position table N(0, 0.3)): the
default init (zero tokens and posemb) would hide ordering bugs.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from divita_jax.convert import __main__ as cli
from divita_jax.convert import hf_ast
from divita_jax.convert.tree import ConversionError
from divita_jax.models import ast, backbone
from divita_jax.trainers import param_groups
from tests.parity import rel_err

TOL = 1e-4  # relative: max |ours - ref| / max |ref|
# Two sizes: (config fields, frames, bins).
SIZES = {
  "small": (
    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    64,
    32,
  ),
  "strided": (
    dict(
      hidden_size=48,
      num_hidden_layers=3,
      num_attention_heads=6,
      frequency_stride=8,
      time_stride=12,
    ),
    100,
    40,
  ),
}


def randomize(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2 and "embeddings." not in name.replace("patch_", ""):
        p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
      elif "layernorm" in name and name.endswith("weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  return model.eval()


def hf_model(size, seed=0, cls=transformers.ASTModel):
  fields, frames, bins = SIZES[size]
  torch.manual_seed(seed)
  config = transformers.ASTConfig(
    intermediate_size=2 * fields["hidden_size"],
    max_length=frames,
    num_mel_bins=bins,
    **fields,
  )
  return randomize(cls(config), seed)


@pytest.fixture(scope="module", params=list(SIZES))
def case(request, tmp_path_factory):
  """(size, torch model, HF folder, converted folder)."""
  size = request.param
  model = hf_model(size)
  folder = str(tmp_path_factory.mktemp(f"hf_ast_{size}"))
  model.save_pretrained(folder)
  out = str(tmp_path_factory.mktemp(f"ast_{size}")) + "/ckpt"
  hf_ast.convert(folder, out)
  return size, model, folder, out


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
  """(torch model, HF folder, converted folder) of the small size."""
  model = hf_model("small")
  folder = str(tmp_path_factory.mktemp("hf_ast_small"))
  model.save_pretrained(folder)
  out = str(tmp_path_factory.mktemp("ast_small")) + "/ckpt"
  hf_ast.convert(folder, out)
  return model, folder, out


def features(size, seed=1, batch=2):
  _, frames, bins = SIZES[size]
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, frames, bins)).astype(np.float32)


def reference(model, x):
  with torch.inference_mode():
    out = model(torch.from_numpy(x))
  return out.pooler_output.numpy(), out.last_hidden_state.numpy()


def ours(ckpt, x, params=None):
  module, variables, _ = backbone.load_backbone(ckpt)
  if params is not None:
    variables = {"params": params}
  pooled, out = jax.jit(module.apply)(variables, x)
  return np.asarray(pooled), np.asarray(out["encoded"])


def test_parity_pooled_and_hidden(case):
  size, model, _, ckpt = case
  x = features(size)
  ref_pooled, ref_hidden = reference(model, x)
  pooled, hidden = ours(ckpt, x)
  assert pooled.shape == ref_pooled.shape and hidden.shape == ref_hidden.shape
  assert rel_err(pooled, ref_pooled) < TOL
  assert rel_err(hidden, ref_hidden) < TOL


def test_spec_and_layers(case):
  size, _, _, ckpt = case
  _, frames, bins = SIZES[size]
  module, variables, spec = backbone.load_backbone(ckpt)
  assert backbone.is_audio_model(spec) and not backbone.is_image_model(spec)
  assert (spec["num_frames"], spec["resolution"]) == (frames, bins)
  assert spec["front_end"] == ast.front_end(bins, frames)  # no preprocessor
  assert backbone.dummy_input(spec, 3).shape == (3, frames, bins)
  ids, num = param_groups.layer_ids(variables["params"])
  depth = spec["model"]["depth"]
  assert num == depth
  blocks = ids["Transformer"]
  assert [
    blocks[f"encoderblock_{i}"]["LayerNorm_0"]["scale"] for i in range(depth)
  ] == list(range(1, depth + 1))
  assert ids["embedding"]["kernel"] == ids["cls_distillation"] == 0
  assert blocks["posembed_input"]["pos_embedding"] == 0
  assert blocks["encoder_norm"]["scale"] == depth + 1


# Negative controls: each known pitfall must break parity.


def _cls_only(encoded):
  return encoded[:, 0]


def _time_major(x):
  b, f, t, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, f * t, d)


@pytest.mark.parametrize(
  "bug", ["cls_only", "time_major", "no_distillation_posemb"]
)
def test_negative_controls_fail(small_folder, bug, monkeypatch):
  model, _, ckpt = small_folder
  x = features("small")
  ref_pooled, ref_hidden = reference(model, x)
  params = None
  if bug == "cls_only":
    monkeypatch.setattr(ast, "pool", _cls_only)
  elif bug == "time_major":
    monkeypatch.setattr(ast, "patch_tokens", _time_major)
  else:  # the posemb of token 1 dropped (a table without the dist slot)
    _, variables, _ = backbone.load_backbone(ckpt)
    params = jax.tree.map(np.array, variables["params"])
    params["Transformer"]["posembed_input"]["pos_embedding"][:, 1] = 0
  pooled, hidden = ours(ckpt, x, params)
  assert (
    max(rel_err(pooled, ref_pooled), rel_err(hidden, ref_hidden)) > 100 * TOL
  )


def test_saved_names_are_the_hubs(case):
  """save_pretrained writes the hub's transformers-4 names, as on the hub."""
  keys = load_file(os.path.join(case[2], "model.safetensors"))
  assert any("attention.attention.query" in k for k in keys)
  assert not any("q_proj" in k for k in keys)


def test_new_naming_and_classifier(tmp_path):
  """transformers-5 names (the in-memory state dict) with the
  `audio_spectrogram_transformer.` prefix of ASTForAudioClassification,
  its classifier discarded; preprocessor_config.json read."""
  model = hf_model("small", cls=transformers.ASTForAudioClassification)
  folder = tmp_path / "hub"
  model.save_pretrained(folder)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  assert any("q_proj" in k for k in sd)
  assert any(k.startswith("classifier.dense") for k in sd)
  save_file(sd, folder / "model.safetensors")
  transformers.ASTFeatureExtractor(
    num_mel_bins=32, max_length=64, mean=-3.0, std=2.0
  ).save_pretrained(folder)
  spec = hf_ast.convert(str(folder), str(tmp_path / "out"))
  assert spec["front_end"]["mean"] == -3.0 and spec["front_end"]["std"] == 2.0
  x = features("small")
  with torch.inference_mode():
    out = model.audio_spectrogram_transformer(torch.from_numpy(x))
  pooled, hidden = ours(str(tmp_path / "out"), x)
  assert rel_err(pooled, out.pooler_output.numpy()) < TOL
  assert rel_err(hidden, out.last_hidden_state.numpy()) < TOL


def _edit(folder, tmp_path, weights=None, config=None, pre=None):
  dst = tmp_path / "edited"
  dst.mkdir()
  sd = load_file(os.path.join(folder, "model.safetensors"))
  save_file(weights(sd) if weights else sd, dst / "model.safetensors")
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
  if pre:
    transformers.ASTFeatureExtractor(**pre).save_pretrained(dst)
  return str(dst)


def _without(sd, key):
  return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize(
  "edit, message",
  [
    (dict(weights=lambda sd: {**sd, "extra.weight": np.zeros(3)}), "extra"),
    (
      dict(
        weights=lambda sd: _without(sd, "encoder.layer.1.output.dense.bias")
      ),
      "encoderblock_1/MlpBlock_0/Dense_1/bias",
    ),
    (dict(config=lambda c: {**c, "model_type": "vit"}), "model_type"),
    (dict(config=lambda c: {**c, "hidden_act": "relu"}), "hidden_act"),
    (dict(config=lambda c: {**c, "qkv_bias": False}), "qkv_bias"),
    (dict(pre=dict(num_mel_bins=64, max_length=64)), "num_mel_bins"),
  ],
)
def test_converter_errors(small_folder, tmp_path, edit, message):
  folder = small_folder[1]
  with pytest.raises(ConversionError, match=message):
    hf_ast.convert(_edit(folder, tmp_path, **edit), str(tmp_path / "o"))
  assert not os.path.exists(tmp_path / "o")


def test_random_tiny_backbone():
  module, variables, spec = backbone.create_backbone(
    "ast", "tiny", resolution=32, num_frames=64
  )
  x = backbone.dummy_input(spec, 2)
  pooled, out = jax.eval_shape(module.apply, variables, x)
  assert pooled.shape == (2, 64) and out["encoded"].shape == (2, 2 + 10, 64)
  assert spec["front_end"]["type"] == "kaldi_fbank"
  with pytest.raises(ValueError, match="not resized"):
    backbone.resize_params(variables["params"], spec, 64, 64)


def test_cli(small_folder, tmp_path, capsys):
  cli.main(
    [
      "--source",
      "hf_ast",
      "--input",
      small_folder[1],
      "--output",
      str(tmp_path / "cli"),
    ]
  )
  assert json.loads(capsys.readouterr().out)["kind"] == "ast"
  with pytest.raises(SystemExit, match="--resolution does not apply"):
    cli.main(
      [
        "--source",
        "hf_whisper",
        "--input",
        small_folder[1],
        "--output",
        str(tmp_path / "x"),
        "--resolution",
        "64",
      ]
    )
  with pytest.raises(SystemExit, match="model_type"):
    cli.main(
      [
        "--source",
        "hf_whisper",
        "--input",
        small_folder[1],
        "--output",
        str(tmp_path / "y"),
      ]
    )
