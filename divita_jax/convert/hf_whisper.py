"""Hugging Face Whisper folders -> models/whisper.py encoders.

  python -m divita_jax.convert --source hf_whisper --input DIR --output OUT

Reads config.json (model_type 'whisper') and the weights (hf.read_weights)
of `WhisperModel` or `WhisperForConditionalGeneration` (hub folders; keys
under `model.`). Only the encoder is converted: the decoder (`decoder.*`)
and the tied output projection (`proj_out.*`) are discarded. Every encoder
key must land on one parameter and every parameter must be written
(tree.check_keys); the attention's key bias, which Whisper lacks, is
written as zeros. The front end comes from preprocessor_config.json when
present, else WhisperFeatureExtractor's defaults at the model's size
(config num_mel_bins, 2 x max_source_positions frames).
"""

import os
import re

import numpy as np

from divita_jax.convert.hf import read_weights
from divita_jax.convert.hf_ast import read_preprocessor
from divita_jax.convert.tree import (
  ConversionError,
  build_params,
  drop_keys,
)
from divita_jax.models import backbone, whisper

_DISCARDED = r"(?:model\.)?(?:decoder\..*|proj_out\.weight)"
_ACT = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


def _rules(heads: int):
  """(regex on an HF key without `model.`, our path, transform)."""
  blk, dst = r"encoder\.layers\.(\d+)\.", r"Transformer/encoderblock_\1/"
  att = dst + "MultiHeadDotProductAttention_0/"
  same = lambda a: a
  t = lambda w: w.T
  conv = lambda w: w.transpose(2, 1, 0)  # [O, I, k] -> [k, I, O]
  qkv = {"q": "query", "k": "key", "v": "value"}
  return [
    (r"encoder\.conv(1|2)\.weight", r"stem_conv\1/kernel", conv),
    (r"encoder\.conv(1|2)\.bias", r"stem_conv\1/bias", same),
    (
      r"encoder\.embed_positions\.weight",
      "Transformer/posembed_input/pos_embedding",
      lambda w: w[None],
    ),
    *[
      (
        blk + rf"self_attn\.{k}_proj\.weight",
        att + f"{name}/kernel",
        lambda w: w.T.reshape(w.shape[1], heads, -1),  # [D, H, hd]
      )
      for k, name in qkv.items()
    ],
    *[
      (
        blk + rf"self_attn\.{k}_proj\.bias",
        att + f"{name}/bias",
        lambda b: b.reshape(heads, -1),
      )
      for k, name in qkv.items()
      if k != "k"
    ],
    (
      blk + r"self_attn\.out_proj\.weight",
      att + "out/kernel",
      lambda w: w.T.reshape(heads, -1, w.shape[0]),  # [H, hd, D]
    ),
    (blk + r"self_attn\.out_proj\.bias", att + "out/bias", same),
    (blk + r"self_attn_layer_norm\.weight", dst + "LayerNorm_0/scale", same),
    (blk + r"self_attn_layer_norm\.bias", dst + "LayerNorm_0/bias", same),
    (blk + r"final_layer_norm\.weight", dst + "LayerNorm_1/scale", same),
    (blk + r"final_layer_norm\.bias", dst + "LayerNorm_1/bias", same),
    (blk + r"fc1\.weight", dst + "MlpBlock_0/Dense_0/kernel", t),
    (blk + r"fc1\.bias", dst + "MlpBlock_0/Dense_0/bias", same),
    (blk + r"fc2\.weight", dst + "MlpBlock_0/Dense_1/kernel", t),
    (blk + r"fc2\.bias", dst + "MlpBlock_0/Dense_1/bias", same),
    (r"encoder\.layer_norm\.weight", "Transformer/encoder_norm/scale", same),
    (r"encoder\.layer_norm\.bias", "Transformer/encoder_norm/bias", same),
  ]


def map_keys(hf: dict, heads: int) -> dict:
  """Encoder state dict -> flat tree (+ zero key biases); unknown keys
  keep their HF name (so the check lists them as unexpected)."""
  rules = _rules(heads)
  out = {}
  for key, value in hf.items():
    k = re.sub(r"^model\.", "", key)
    for pattern, template, fn in rules:
      m = re.fullmatch(pattern, k)
      if m:
        try:
          out[m.expand(template)] = np.asarray(fn(value), np.float32)
        except ValueError as e:  # A reshape of a wrongly sized weight.
          raise ConversionError(f"{key}: {e}") from e
        break
    else:
      out[key] = value
  for path in list(out):
    if path.endswith("/key/kernel"):
      out[path[: -len("kernel")] + "bias"] = np.zeros(
        out[path].shape[1:], np.float32
      )
  return out


def model_fields(config: dict, path: str) -> dict:
  """config.json -> whisper.WhisperEncoder fields (errors name the field)."""
  if config.get("model_type") != "whisper":
    raise ConversionError(
      f"{path}: wrong architecture: config.json model_type "
      f"{config.get('model_type')!r}, expected 'whisper'."
    )
  act = config.get("activation_function", "gelu")
  if act not in _ACT:
    raise ConversionError(
      f"{path}: config.json activation_function {act!r} is not supported; "
      f"{list(_ACT)}."
    )
  return dict(
    width=config["d_model"],
    depth=config["encoder_layers"],
    mlp_dim=config["encoder_ffn_dim"],
    num_heads=config["encoder_attention_heads"],
    max_source_positions=config.get("max_source_positions", 1500),
    gelu_approximate=_ACT[act],
  )


def read_front_end(path: str, config: dict, fields: dict) -> dict:
  """WhisperFeatureExtractor's parameters (folder or defaults), checked
  against the encoder's input."""
  bins = config.get("num_mel_bins", 80)
  frames = whisper.STRIDE * fields["max_source_positions"]
  pre = read_preprocessor(path, "WhisperFeatureExtractor")
  if pre is None:
    return whisper.front_end(bins, frames)
  if pre.get("dither", 0.0):
    raise ConversionError(
      f"{path}: preprocessor_config.json dither={pre['dither']} is not "
      "supported (features would be random)."
    )
  hop = pre.get("hop_length", 160)
  rate = pre.get("sampling_rate", 16000)
  samples = pre.get("n_samples", pre.get("chunk_length", 30) * rate)
  fe = whisper.front_end(
    pre.get("feature_size", 80),
    samples // hop,
    sampling_rate=rate,
    hop_length=hop,
    n_fft=pre.get("n_fft", 400),
  )
  if (fe["num_mel_bins"], fe["num_frames"]) != (bins, frames):
    raise ConversionError(
      f"{path}: preprocessor_config.json feature_size / frames "
      f"{fe['num_mel_bins']} / {fe['num_frames']} differ from config.json's "
      f"num_mel_bins / 2 x max_source_positions {bins} / {frames}."
    )
  return fe


def read(path: str, drop=()) -> tuple[dict, dict]:
  """HF folder -> (encoder params tree, spec); raises ConversionError."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input {path} does not exist.")
  config, hf = read_weights(path)
  fields = model_fields(config, path)
  front_end = read_front_end(path, config, fields)
  hf = drop_keys(hf, drop, "drop")
  hf = {k: v for k, v in hf.items() if not re.fullmatch(_DISCARDED, k)}
  flat = map_keys(hf, fields["num_heads"])
  spec = backbone.make_spec(
    "whisper",
    fields,
    variant=None,
    resolution=front_end["num_mel_bins"],
    num_frames=front_end["num_frames"],
    front_end=front_end,
    source={"type": "hf_whisper", "path": os.path.abspath(path)},
  )
  return build_params(flat, spec), spec


def convert(path: str, output: str, *, drop=()) -> dict:
  """Reads, checks and writes a Whisper encoder; returns its spec.

  drop: regexes on the folder's own keys to discard before the check.
  """
  params, spec = read(path, drop)
  spec["source"]["drop"] = list(drop)
  backbone.save_backbone(output, params, spec)
  return spec
