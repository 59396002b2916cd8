"""Whisper encoder: parity with transformers' WhisperModel, converter checks.

Random weights made adversarial (weights N(0, 1 / fan_in), LayerNorm
scales U(0.5, 1.5), biases N(0, 0.3)); the position table keeps its
sinusoids (as every checkpoint stores them).
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from divita_jax.convert import hf_whisper
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone, whisper
from divita_jax.trainers import param_groups
from tests.parity import rel_err

TOL = 1e-4  # relative: max |ours - ref| / max |ref|
# Two sizes: encoder config fields (frames = 2 x max_source_positions).
SIZES = {
  "small": dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    num_mel_bins=16,
    max_source_positions=50,
  ),
  "wider": dict(
    d_model=64,
    encoder_layers=3,
    encoder_attention_heads=8,
    num_mel_bins=24,
    max_source_positions=40,
  ),
}


def randomize(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embed_positions" in name:
        continue
      if p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
      elif "layer_norm" in name and name.endswith("weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  return model.eval()


def hf_model(size, seed=0, cls=transformers.WhisperModel):
  fields = SIZES[size]
  torch.manual_seed(seed)
  config = transformers.WhisperConfig(
    encoder_ffn_dim=2 * fields["d_model"],
    decoder_layers=1,
    decoder_attention_heads=4,
    decoder_ffn_dim=32,
    vocab_size=64,
    max_target_positions=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    **fields,
  )
  return randomize(cls(config), seed)


def _convert(tmp_path_factory, size):
  model = hf_model(size)
  folder = str(tmp_path_factory.mktemp(f"hf_whisper_{size}"))
  model.save_pretrained(folder)
  out = str(tmp_path_factory.mktemp(f"whisper_{size}")) + "/ckpt"
  hf_whisper.convert(folder, out)
  return model, folder, out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(torch model, HF folder, converted folder) of the small size."""
  return _convert(tmp_path_factory, "small")


@pytest.fixture(scope="module", params=list(SIZES))
def case(request, small, tmp_path_factory):
  if request.param == "small":
    return "small", *small
  return request.param, *_convert(tmp_path_factory, request.param)


def features(size, seed=1, batch=2):
  f = SIZES[size]
  rng = np.random.default_rng(seed)
  shape = (batch, 2 * f["max_source_positions"], f["num_mel_bins"])
  return rng.normal(size=shape).astype(np.float32)


def reference(model, x):
  """(pooled = mean of the frames, frames) of the torch encoder."""
  with torch.inference_mode():
    frames = model.encoder(torch.from_numpy(x).transpose(1, 2))
  frames = frames.last_hidden_state.numpy()
  return frames.mean(axis=1), frames


def ours(ckpt, x, params=None):
  module, variables, _ = backbone.load_backbone(ckpt)
  if params is not None:
    variables = {"params": params}
  pooled, out = jax.jit(module.apply)(variables, x)
  return np.asarray(pooled), np.asarray(out["encoded"])


def test_parity_pooled_and_frames(case):
  size, model, _, ckpt = case
  x = features(size)
  ref_pooled, ref_frames = reference(model, x)
  pooled, frames = ours(ckpt, x)
  assert frames.shape == ref_frames.shape
  assert rel_err(pooled, ref_pooled) < TOL
  assert rel_err(frames, ref_frames) < TOL


def test_spec_layers_and_span(small):
  _, _, ckpt = small
  module, variables, spec = backbone.load_backbone(ckpt)
  assert backbone.is_audio_model(spec)
  assert (spec["num_frames"], spec["resolution"]) == (100, 16)
  assert spec["front_end"] == whisper.front_end(16, 100)  # no preprocessor
  assert spec["front_end"]["chunk_length"] == 1.0
  key_bias = variables["params"]["Transformer"]["encoderblock_0"][
    "MultiHeadDotProductAttention_0"
  ]["key"]["bias"]
  assert not np.asarray(key_bias).any()
  ids, num = param_groups.layer_ids(variables["params"])
  blocks = ids["Transformer"]
  assert num == 2
  order = [blocks[f"encoderblock_{i}"]["LayerNorm_0"]["scale"] for i in (0, 1)]
  assert order == [1, 2]
  assert ids["stem_conv1"]["kernel"] == ids["stem_conv2"]["kernel"] == 0
  assert blocks["posembed_input"]["pos_embedding"] == 0
  assert blocks["encoder_norm"]["scale"] == 3
  # 20 ms per encoder frame: [0.1, 0.25) s -> frames 5..12 of 50.
  assert whisper.span_frames(spec, 0.1, 0.25) == slice(5, 13)
  assert whisper.span_frames(spec, 0.9, 5.0) == slice(45, 50)


# Negative controls: each known pitfall must break parity.


@pytest.mark.parametrize("bug", ["no_conv_gelu", "posemb_offset"])
def test_negative_controls_fail(small, bug, monkeypatch):
  model, _, ckpt = small
  x = features("small")
  ref_pooled, ref_frames = reference(model, x)
  params = None
  if bug == "no_conv_gelu":
    monkeypatch.setattr(whisper, "conv_gelu", lambda x: x)
  else:  # positions 1..N instead of 0..N-1
    _, variables, _ = backbone.load_backbone(ckpt)
    params = jax.tree.map(np.array, variables["params"])
    pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    pe[:] = np.roll(pe, -1, axis=1)
  pooled, frames = ours(ckpt, x, params)
  assert (
    max(rel_err(pooled, ref_pooled), rel_err(frames, ref_frames)) > 100 * TOL
  )


def test_conditional_generation_folder(tmp_path):
  """Hub folders: WhisperForConditionalGeneration (`model.` keys), with a
  preprocessor_config.json."""
  model = hf_model("small", cls=transformers.WhisperForConditionalGeneration)
  model.save_pretrained(tmp_path / "hub")
  keys = load_file(tmp_path / "hub" / "model.safetensors")
  assert any(k.startswith("model.encoder.") for k in keys)
  transformers.WhisperFeatureExtractor(
    feature_size=16, chunk_length=1
  ).save_pretrained(tmp_path / "hub")
  spec = hf_whisper.convert(str(tmp_path / "hub"), str(tmp_path / "out"))
  assert spec["front_end"]["n_samples"] == 16000
  x = features("small")
  ref_pooled, ref_frames = reference(model.model, x)
  pooled, frames = ours(str(tmp_path / "out"), x)
  assert rel_err(frames, ref_frames) < TOL and rel_err(pooled, ref_pooled) < TOL


def _edit(folder, tmp_path, weights=None, config=None, pre=None):
  dst = tmp_path / "edited"
  dst.mkdir()
  sd = load_file(os.path.join(folder, "model.safetensors"))
  save_file(weights(sd) if weights else sd, dst / "model.safetensors")
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
  if pre:
    transformers.WhisperFeatureExtractor(**pre).save_pretrained(dst)
  return str(dst)


def _without(sd, key):
  return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      dict(weights=lambda sd: {**sd, "encoder.extra": np.zeros(3)}),
      "encoder.extra",
    ),
    (
      dict(weights=lambda sd: _without(sd, "encoder.layers.1.fc2.bias")),
      "encoderblock_1/MlpBlock_0/Dense_1/bias",
    ),
    (
      dict(
        weights=lambda sd: {
          **sd,
          "encoder.layers.0.self_attn.k_proj.bias": np.zeros(32),
        }
      ),
      "k_proj.bias",
    ),
    (dict(config=lambda c: {**c, "model_type": "ast"}), "model_type"),
    (
      dict(config=lambda c: {**c, "activation_function": "relu"}),
      "activation_function",
    ),
    (dict(pre=dict(feature_size=16, chunk_length=2)), "feature_size"),
    (dict(pre=dict(feature_size=16, chunk_length=1, dither=1e-4)), "dither"),
  ],
)
def test_converter_errors(small, tmp_path, edit, message):
  with pytest.raises(ConversionError, match=message):
    hf_whisper.convert(_edit(small[1], tmp_path, **edit), str(tmp_path / "o"))
  assert not os.path.exists(tmp_path / "o")


def test_random_tiny_backbone():
  module, variables, spec = backbone.create_backbone(
    "whisper", "tiny", resolution=16, num_frames=100
  )
  x = backbone.dummy_input(spec, 2)
  pooled, out = jax.eval_shape(module.apply, variables, x)
  assert pooled.shape == (2, 64) and out["encoded"].shape == (2, 50, 64)
  with pytest.raises(ValueError, match="chunks of 100"):
    module.apply(variables, x[:, :60])
