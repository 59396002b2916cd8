"""Hugging Face V-JEPA 2 folders -> a `vjepa2` backbone (the encoder).

  python -m divita_jax.convert --source hf_vjepa2 --input HF_FOLDER \
    --output DIR [--num_frames 16] [--resolution R]

Input: a `VJEPA2Model` or `VJEPA2ForVideoClassification` folder
(config.json with model_type 'vjepa2', model.safetensors or
pytorch_model.bin). Only the encoder is converted: the predictor
(`predictor.*`) and a classifier's attentive pooler and head (`pooler.*`,
`classifier.*`) are left out on purpose; any other key the mapping does
not know, and any encoder key the file lacks, is an error naming it.

spec.json: num_frames = --num_frames or config.json frames_per_clip (the
clips the checkpoint was trained on; rotary positions take any multiple
of the tubelet); resolution = --resolution or crop_size; mean / std and
the resize / crop rule from (video_)preprocessor_config.json when the
folder has one, else VJEPA2VideoProcessor's defaults (ImageNet mean /
std, bilinear resize of the short side to crop * 256 / 224, centre crop).
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
from divita_jax.models import backbone

IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
# Parts of the checkpoint that are not the encoder (left out on purpose).
NOT_ENCODER = (r"predictor\..*", r"pooler\..*", r"classifier\..*")
_ACT = {"gelu": False, "gelu_python": False, "gelu_pytorch_tanh": True}
_PIL = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


def model_fields(config: dict) -> dict:
  """config.json -> VJEPA2 fields; a config it cannot represent raises
  naming the field."""
  if config.get("model_type") != "vjepa2":
    raise ConversionError(
      f"config.json model_type {config.get('model_type')!r}: not a V-JEPA 2 "
      "folder (expected 'vjepa2')."
    )
  act = config.get("hidden_act", "gelu")
  checks = {
    "hidden_act": act in _ACT,
    "in_chans": config.get("in_chans", 3) == 3,
    "qkv_bias": config.get("qkv_bias", True),
    "patch_size": isinstance(config.get("patch_size", 16), int),
  }
  for field, ok in checks.items():
    if not ok:
      raise ConversionError(
        f"config.json {field} {config.get(field)!r} is not supported (the "
        f"vjepa2 module has exact or tanh GELU, 3 channels, q/k/v biases, "
        "square patches)."
      )
  width = int(config["hidden_size"])
  return dict(
    width=width,
    depth=int(config["num_hidden_layers"]),
    mlp_dim=int(width * config.get("mlp_ratio", 4.0)),
    num_heads=int(config["num_attention_heads"]),
    patch_size=int(config.get("patch_size", 16)),
    tubelet=int(config.get("tubelet_size", 2)),
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
    gelu_approximate=_ACT[act],
  )


def _rules(heads: int):
  """(regex on an encoder key, our path, transform)."""
  blk = r"layer\.(\d+)\."
  dst = r"Transformer/encoderblock_\1/"
  att = dst + "MultiHeadDotProductAttention_0/"
  same = lambda a: a
  t = lambda w: w.T
  return [
    (
      r"embeddings\.patch_embeddings\.proj\.weight",
      "embedding/kernel",
      lambda w: w.transpose(2, 3, 4, 1, 0),  # [D,3,t,h,w] -> [t,h,w,3,D]
    ),
    (r"embeddings\.patch_embeddings\.proj\.bias", "embedding/bias", same),
    (blk + r"norm1\.weight", dst + "LayerNorm_0/scale", same),
    (blk + r"norm1\.bias", dst + "LayerNorm_0/bias", same),
    (blk + r"norm2\.weight", dst + "LayerNorm_1/scale", same),
    (blk + r"norm2\.bias", dst + "LayerNorm_1/bias", same),
    (
      blk + r"attention\.(query|key|value)\.weight",
      att + r"\2/kernel",
      lambda w: w.T.reshape(w.shape[1], heads, -1),  # [D, H, hd]
    ),
    (
      blk + r"attention\.(query|key|value)\.bias",
      att + r"\2/bias",
      lambda b: b.reshape(heads, -1),
    ),
    (
      blk + r"attention\.proj\.weight",
      att + "out/kernel",
      lambda w: w.T.reshape(heads, -1, w.shape[0]),  # [H, hd, D]
    ),
    (blk + r"attention\.proj\.bias", att + "out/bias", same),
    (blk + r"mlp\.fc1\.weight", dst + "MlpBlock_0/Dense_0/kernel", t),
    (blk + r"mlp\.fc1\.bias", dst + "MlpBlock_0/Dense_0/bias", same),
    (blk + r"mlp\.fc2\.weight", dst + "MlpBlock_0/Dense_1/kernel", t),
    (blk + r"mlp\.fc2\.bias", dst + "MlpBlock_0/Dense_1/bias", same),
    (r"layernorm\.weight", "Transformer/encoder_norm/scale", same),
    (r"layernorm\.bias", "Transformer/encoder_norm/bias", same),
  ]


def map_keys(hf: dict, heads: int) -> dict:
  """HF `encoder.*` keys -> our flat paths; any other key keeps its HF
  name (check_keys then names it as unexpected)."""
  rules = _rules(heads)
  out = {}
  for key, value in hf.items():
    for pattern, template, fn in rules:
      m = re.fullmatch(r"encoder\." + pattern, key)
      if m:
        out[m.expand(template)] = np.asarray(fn(value))
        break
    else:
      out[key] = value
  return out


def preprocessing(folder: str, config: dict) -> dict:
  """The checkpoint's input recipe: the folder's processor config, else
  VJEPA2VideoProcessor's defaults."""
  crop = int(config.get("crop_size", 256))
  pre = dict(
    resolution=crop,
    num_frames=int(config.get("frames_per_clip", 64)),
    resize=int(crop * 256 / 224),  # short side, then the centre crop
    crop=crop,
    interpolation="bilinear",
    **IMAGENET,
  )
  for name in PROCESSOR_FILES:
    path = os.path.join(folder, name)
    if os.path.exists(path):
      with open(path) as f:
        p = json.load(f)
      c = p.get("crop_size", crop)
      c = int(c["height"] if isinstance(c, dict) else c)
      pre.update(resolution=c, crop=c, resize=int(c * 256 / 224))
      s = p.get("size") or {}
      if isinstance(s, dict) and s.get("shortest_edge"):
        pre["resize"] = int(s["shortest_edge"])
      pre["interpolation"] = _PIL.get(p.get("resample", 2), "bilinear")
      pre["mean"] = [float(v) for v in p.get("image_mean", pre["mean"])]
      pre["std"] = [float(v) for v in p.get("image_std", pre["std"])]
      pre["processor_file"] = name
      break
  return pre


def convert(
  input_dir: str,
  output_dir: str,
  *,
  resolution: int | None = None,
  num_frames: int | None = None,
  drop=(),
  normalization: str | None = None,
) -> dict:
  """Reads, checks and writes a V-JEPA 2 encoder; returns its spec.

  drop: regexes of source keys to discard too; normalization: a
  backbone.NORMALIZATIONS name replacing the checkpoint's mean / std.
  """
  config, hf = read_weights(input_dir)
  fields = model_fields(config)
  pre = preprocessing(input_dir, config)
  frames = num_frames or pre["num_frames"]
  if frames % fields["tubelet"]:
    raise ConversionError(
      f"num_frames {frames} is not a multiple of tubelet_size "
      f"{fields['tubelet']}."
    )
  hf = {k.removeprefix("vjepa2."): v for k, v in hf.items()}
  hf = drop_keys(hf, NOT_ENCODER)
  hf = drop_keys(hf, drop, "drop")
  flat = map_keys(hf, fields["num_heads"])
  spec = backbone.make_spec(
    "vjepa2",
    fields,
    variant=None,
    resolution=resolution or pre["resolution"],
    num_frames=frames,
    normalization=normalization,
    mean=pre["mean"],
    std=pre["std"],
    preprocessing=pre,
    source={"type": "hf_vjepa2", "path": os.path.abspath(input_dir)},
  )
  params = build_params(flat, spec)
  backbone.save_backbone(output_dir, {"params": params}, spec)
  return spec
