"""Hugging Face AST folders (`ASTModel`, `ASTForAudioClassification`) ->
models/ast.py backbones.

  python -m divita_jax.convert --source hf_ast --input DIR --output OUT

Reads config.json (model_type 'audio-spectrogram-transformer') and the
weights (hf.read_weights), in either naming: transformers 5 (`layers.{i}.
attention.q_proj`, `mlp.fc1`) or the hub's (`encoder.layer.{i}.attention.
attention.query`, `intermediate.dense`), with or without the
`audio_spectrogram_transformer.` prefix. The AudioSet classifier
(`classifier.layernorm`, `classifier.dense`) is discarded: the backbone
ends at the pooled output. Every other key must land on one parameter and
every parameter must be written (tree.check_keys). The front end comes
from preprocessor_config.json when present, else ASTFeatureExtractor's
defaults at the model's input size; both must agree with config.json.
"""

import json
import os
import re

import numpy as np

from divita_jax.convert.hf import read_weights
from divita_jax.convert.tree import (
  ConversionError,
  build_params,
  drop_keys,
)
from divita_jax.models import ast, backbone

MODEL_TYPE = "audio-spectrogram-transformer"
_ACT = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
_HEAD = r"classifier\.(layernorm|dense)\.(weight|bias)"
# Hub (transformers 4) names -> transformers 5 names, applied in order.
_LEGACY = [
  (r"encoder\.layer\.(\d+)\.", r"layers.\1."),
  (r"attention\.attention\.(query|key|value)", r"attention.\1"),
  (r"attention\.(q|k|v)\w*\.", r"attention.\1_proj."),
  (r"attention\.output\.dense", "attention.o_proj"),
  (r"intermediate\.dense", "mlp.fc1"),
  (r"(\d+)\.output\.dense", r"\1.mlp.fc2"),
]


def read_preprocessor(path: str, extractor: str) -> dict | None:
  """The folder's preprocessor_config.json (None when absent); its
  feature_extractor_type, when given, must be `extractor`."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  file = os.path.join(folder, "preprocessor_config.json")
  if not os.path.exists(file):
    return None
  with open(file) as f:
    config = json.load(f)
  kind = config.get("feature_extractor_type", extractor)
  if kind != extractor:
    raise ConversionError(
      f"{file}: feature_extractor_type {kind!r}, expected {extractor!r}."
    )
  return config


def _rename(key: str) -> str:
  key = re.sub(r"^audio_spectrogram_transformer\.", "", key)
  for pattern, repl in _LEGACY:
    key = re.sub(pattern, repl, key)
  return key


def _rules(heads: int):
  """(regex on a transformers 5 key, our path template, transform)."""
  blk, dst = r"layers\.(\d+)\.", r"Transformer/encoderblock_\1/"
  att = dst + "MultiHeadDotProductAttention_0/"
  same = lambda a: a
  t = lambda w: w.T
  qkv = {"q": "query", "k": "key", "v": "value"}
  return [
    (r"embeddings\.cls_token", "cls", same),
    (r"embeddings\.distillation_token", "cls_distillation", same),
    (
      r"embeddings\.position_embeddings",
      "Transformer/posembed_input/pos_embedding",
      same,
    ),
    (
      r"embeddings\.patch_embeddings\.projection\.weight",
      "embedding/kernel",
      lambda w: w.transpose(2, 3, 1, 0),  # [D, 1, f, t] -> [f, t, 1, D]
    ),
    (r"embeddings\.patch_embeddings\.projection\.bias", "embedding/bias", same),
    *[
      (
        blk + rf"attention\.{k}_proj\.weight",
        att + f"{name}/kernel",
        lambda w: w.T.reshape(w.shape[1], heads, -1),  # [D, H, hd]
      )
      for k, name in qkv.items()
    ],
    *[
      (
        blk + rf"attention\.{k}_proj\.bias",
        att + f"{name}/bias",
        lambda b: b.reshape(heads, -1),
      )
      for k, name in qkv.items()
    ],
    (
      blk + r"attention\.o_proj\.weight",
      att + "out/kernel",
      lambda w: w.T.reshape(heads, -1, w.shape[0]),  # [H, hd, D]
    ),
    (blk + r"attention\.o_proj\.bias", att + "out/bias", same),
    (blk + r"layernorm_before\.weight", dst + "LayerNorm_0/scale", same),
    (blk + r"layernorm_before\.bias", dst + "LayerNorm_0/bias", same),
    (blk + r"layernorm_after\.weight", dst + "LayerNorm_1/scale", same),
    (blk + r"layernorm_after\.bias", dst + "LayerNorm_1/bias", same),
    (blk + r"mlp\.fc1\.weight", dst + "MlpBlock_0/Dense_0/kernel", t),
    (blk + r"mlp\.fc1\.bias", dst + "MlpBlock_0/Dense_0/bias", same),
    (blk + r"mlp\.fc2\.weight", dst + "MlpBlock_0/Dense_1/kernel", t),
    (blk + r"mlp\.fc2\.bias", dst + "MlpBlock_0/Dense_1/bias", same),
    (r"layernorm\.weight", "Transformer/encoder_norm/scale", same),
    (r"layernorm\.bias", "Transformer/encoder_norm/bias", same),
  ]


def map_keys(hf: dict, heads: int) -> dict:
  """HF state dict -> flat tree; unknown keys keep their HF name (so the
  check lists them as unexpected)."""
  rules = _rules(heads)
  out = {}
  for key, value in hf.items():
    k = _rename(key)
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
  return out


def _field(config, key, want, path):
  if config.get(key, want) != want:
    raise ConversionError(
      f"{path}: config.json {key}={config[key]!r} is not supported "
      f"(only {want!r})."
    )


def model_fields(config: dict, path: str) -> dict:
  """config.json -> ast.AST fields (errors name the field)."""
  if config.get("model_type") != MODEL_TYPE:
    raise ConversionError(
      f"{path}: wrong architecture: config.json model_type "
      f"{config.get('model_type')!r}, expected {MODEL_TYPE!r}."
    )
  act = config.get("hidden_act", "gelu")
  if act not in _ACT:
    raise ConversionError(
      f"{path}: config.json hidden_act {act!r} is not supported; {list(_ACT)}."
    )
  _field(config, "qkv_bias", True, path)
  if not isinstance(config.get("patch_size", 16), int):
    raise ConversionError(f"{path}: config.json patch_size must be an int.")
  return dict(
    width=config["hidden_size"],
    depth=config["num_hidden_layers"],
    mlp_dim=config["intermediate_size"],
    num_heads=config["num_attention_heads"],
    patch_size=config.get("patch_size", 16),
    frequency_stride=config.get("frequency_stride", 10),
    time_stride=config.get("time_stride", 10),
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
    gelu_approximate=_ACT[act],
  )


def read_front_end(path: str, config: dict) -> dict:
  """ASTFeatureExtractor's parameters (folder or defaults), checked
  against the model's input size."""
  bins = config.get("num_mel_bins", 128)
  frames = config.get("max_length", 1024)
  pre = read_preprocessor(path, "ASTFeatureExtractor")
  if pre is None:
    return ast.front_end(bins, frames)
  fe = ast.front_end(
    pre.get("num_mel_bins", 128),
    pre.get("max_length", 1024),
    sampling_rate=pre.get("sampling_rate", 16000),
    do_normalize=pre.get("do_normalize", True),
    mean=pre.get("mean", ast.AUDIOSET_MEAN),
    std=pre.get("std", ast.AUDIOSET_STD),
  )
  if (fe["num_mel_bins"], fe["num_frames"]) != (bins, frames):
    raise ConversionError(
      f"{path}: preprocessor_config.json num_mel_bins / max_length "
      f"{fe['num_mel_bins']} / {fe['num_frames']} differ from config.json's "
      f"{bins} / {frames}."
    )
  return fe


def read(path: str, drop=()) -> tuple[dict, dict]:
  """HF folder -> (params tree, spec); raises ConversionError."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input {path} does not exist.")
  config, hf = read_weights(path)
  fields = model_fields(config, path)
  front_end = read_front_end(path, config)
  hf = drop_keys(hf, drop, "drop")
  hf = {k: v for k, v in hf.items() if not re.fullmatch(_HEAD, _rename(k))}
  flat = map_keys(hf, fields["num_heads"])
  spec = backbone.make_spec(
    "ast",
    fields,
    variant=None,
    resolution=front_end["num_mel_bins"],
    num_frames=front_end["num_frames"],
    front_end=front_end,
    source={"type": "hf_ast", "path": os.path.abspath(path)},
  )
  return build_params(flat, spec), spec


def convert(path: str, output: str, *, drop=()) -> dict:
  """Reads, checks and writes an AST backbone; returns its spec.

  drop: regexes on the folder's own keys to discard before the check.
  """
  params, spec = read(path, drop)
  spec["source"]["drop"] = list(drop)
  backbone.save_backbone(output, params, spec)
  return spec
