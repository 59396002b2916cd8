"""Hugging Face VideoPrism folders -> a `videoprism` backbone.

  python -m divita_jax.convert --source hf_videoprism --input HF_FOLDER \
    --output DIR [--num_frames T] [--resolution R]

Input: a `VideoPrismVisionModel` folder (config.json model_type
'videoprism_vision_model'), or one holding it: `VideoPrismVideoModel`,
`VideoPrismForVideoClassification` (same type, keys under
`vision_model.`) or the video-text `VideoPrismClipModel` (type
'videoprism', its `vision_config`, keys under `video_model.vision_model.`).
Only the vision encoder is converted: the text tower, the auxiliary
layers, the attention-pooling head and a classifier (NOT_ENCODER) are
left out on purpose; any other key the mapping does not know, and any
parameter the file lacks, is an error naming it.

The reference's LayerNorms compute with (1 + weight): our scale is that
sum. The patch conv's one-frame tubelet becomes a 2-D kernel [p, p, 3,
D]. spec.json: native_resolution / native_frames (image_size /
num_frames of config.json) size the position tables; --resolution /
--num_frames set the input size the backbone runs at (the tables are
resized as the reference's interpolate_pos_encoding does). Inputs in
[0, 1] (zero_one: the processor does not normalise), frames resized to
resolution x resolution, no crop.
"""

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

MODEL_TYPE = "videoprism_vision_model"
# Parts of the folders above that are not the vision encoder.
NOT_ENCODER = (
  r"text_model\..*",
  r"(video_model\.)?(auxiliary_layers|head|head_layernorm|classifier)\..*",
)
ENCODER_PREFIXES = ("video_model.vision_model.", "vision_model.")
_ACT = {"gelu": False, "gelu_python": False, "gelu_pytorch_tanh": True}


def model_fields(config: dict) -> dict:
  """config.json -> VideoPrism fields; a config the module cannot
  represent raises naming the field."""
  if config.get("model_type") != MODEL_TYPE:
    raise ConversionError(
      f"config.json model_type {config.get('model_type')!r}: not a "
      f"VideoPrism vision folder (expected {MODEL_TYPE!r})."
    )
  tubelet = list(config.get("tubelet_size", (1, 18, 18)))
  size = config.get("image_size", 288)
  act = config.get("hidden_act", "gelu_python")
  checks = {
    "tubelet_size": len(tubelet) == 3
    and tubelet[0] == 1
    and tubelet[1] == tubelet[2],
    "image_size": isinstance(size, int),
    "hidden_act": act in _ACT,
    "num_channels": config.get("num_channels", 3) == 3,
    "qkv_bias": config.get("qkv_bias", True),
  }
  for field, ok in checks.items():
    if not ok:
      raise ConversionError(
        f"config.json {field} {config.get(field)!r} is not supported (the "
        "videoprism module has one-frame square tubelets, square images, "
        "exact or tanh GELU, 3 channels, q/k/v biases)."
      )
  cap = config.get("attn_logit_softcapping", 50.0)
  return dict(
    width=int(config["hidden_size"]),
    depth=int(config["num_spatial_layers"]),
    mlp_dim=int(config["intermediate_size"]),
    num_heads=int(config["num_attention_heads"]),
    native_resolution=int(size),
    native_frames=int(config["num_frames"]),
    patch_size=int(tubelet[1]),
    temporal_depth=int(config["num_temporal_layers"]),
    softcap=None if cap is None else float(cap),
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
    gelu_approximate=_ACT[act],
  )


def _rules(heads: int, depth: int):
  """(regex on an HF key, our path or a function of the match, transform)."""
  same = lambda a: a
  t = lambda w: w.T
  plus_one = lambda w: w + 1.0  # the reference's LayerNorm: 1 + weight
  sp, tp = "SpatialTransformer/", "TemporalTransformer/"

  def block(m):  # spatial_layers.i -> i, temporal_layers.j -> depth + j
    i = int(m.group(2))
    name = sp if m.group(1) == "spatial" else tp
    first = 0 if m.group(1) == "spatial" else depth
    return f"{name}encoderblock_{first + i}/"

  blk = r"(spatial|temporal)_layers\.(\d+)\."
  att = "MultiHeadDotProductAttention_0/"
  return [
    (
      r"spatial_embeddings\.patch_embeddings\.projection\.weight",
      "embedding/kernel",
      lambda w: w[:, :, 0].transpose(2, 3, 1, 0),  # [D,3,1,p,p]->[p,p,3,D]
    ),
    (
      r"spatial_embeddings\.patch_embeddings\.projection\.bias",
      "embedding/bias",
      same,
    ),
    (
      r"spatial_embeddings\.position_embeddings",
      sp + "posembed_input/pos_embedding",
      same,
    ),
    (
      r"temporal_embeddings\.position_embeddings",
      tp + "posembed_input/pos_embedding",
      same,
    ),
    (r"layernorm1\.weight", sp + "encoder_norm/scale", plus_one),
    (r"layernorm1\.bias", sp + "encoder_norm/bias", same),
    (r"layernorm2\.weight", tp + "encoder_norm/scale", plus_one),
    (r"layernorm2\.bias", tp + "encoder_norm/bias", same),
    (blk + r"layernorm_before\.weight", "LayerNorm_0/scale", plus_one),
    (blk + r"layernorm_before\.bias", "LayerNorm_0/bias", same),
    (blk + r"layernorm_after\.weight", "LayerNorm_1/scale", plus_one),
    (blk + r"layernorm_after\.bias", "LayerNorm_1/bias", same),
    (
      blk + r"attention\.([qkv])_proj\.weight",
      lambda m: f"{att}{_QKV[m.group(3)]}/kernel",
      lambda w: w.T.reshape(w.shape[1], heads, -1),  # [D, H, hd]
    ),
    (
      blk + r"attention\.([qkv])_proj\.bias",
      lambda m: f"{att}{_QKV[m.group(3)]}/bias",
      lambda b: b.reshape(heads, -1),
    ),
    (
      blk + r"attention\.o_proj\.weight",
      att + "out/kernel",
      lambda w: w.T.reshape(heads, -1, w.shape[0]),  # [H, hd, D]
    ),
    (blk + r"attention\.o_proj\.bias", att + "out/bias", same),
    (blk + r"mlp\.fc1\.weight", "MlpBlock_0/Dense_0/kernel", t),
    (blk + r"mlp\.fc1\.bias", "MlpBlock_0/Dense_0/bias", same),
    (blk + r"mlp\.fc2\.weight", "MlpBlock_0/Dense_1/kernel", t),
    (blk + r"mlp\.fc2\.bias", "MlpBlock_0/Dense_1/bias", same),
  ], block


_QKV = {"q": "query", "k": "key", "v": "value"}


def map_keys(hf: dict, heads: int, depth: int) -> dict:
  """HF keys -> our flat paths; an unknown key keeps its HF name
  (check_keys then names it as unexpected)."""
  rules, block = _rules(heads, depth)
  out = {}
  for key, value in hf.items():
    for pattern, dst, fn in rules:
      m = re.fullmatch(pattern, key)
      if m:
        path = dst(m) if callable(dst) else dst
        if pattern.startswith("(spatial|temporal)"):
          path = block(m) + path
        out[path] = np.asarray(fn(value), np.float32)
        break
    else:
      out[key] = value
  return out


def _encoder_key(key: str) -> str:
  for prefix in ENCODER_PREFIXES:
    if key.startswith(prefix):
      return key[len(prefix) :]
  return key


def convert(
  input_dir: str,
  output_dir: str,
  *,
  resolution: int | None = None,
  num_frames: int | None = None,
  drop=(),
  normalization: str | None = None,
) -> dict:
  """Reads, checks and writes a VideoPrism encoder; returns its spec.

  drop: regexes of source keys to discard; normalization: a
  backbone.NORMALIZATIONS name replacing zero_one.
  """
  config, hf = read_weights(input_dir)
  if config.get("model_type") == "videoprism":  # the video-text model
    config = config.get("vision_config") or {}
  fields = model_fields(config)
  hf = drop_keys(drop_keys(hf, NOT_ENCODER), drop, "drop")
  hf = {_encoder_key(k): v for k, v in hf.items()}
  flat = map_keys(hf, fields["num_heads"], fields["depth"])
  res = fields["native_resolution"]
  pre = dict(
    resolution=res,
    num_frames=fields["native_frames"],
    resize=[res, res],  # VideoPrismProcessor: straight to 288 x 288
    crop=None,
    interpolation="bicubic",  # LlavaOnevisionVideoProcessor's resample
    mean=[0.0] * 3,
    std=[1.0] * 3,
  )
  spec = backbone.make_spec(
    "videoprism",
    fields,
    variant=None,
    resolution=resolution or res,
    num_frames=num_frames or fields["native_frames"],
    normalization=normalization or "zero_one",
    preprocessing=pre,
    source={"type": "hf_videoprism", "path": os.path.abspath(input_dir)},
  )
  params = build_params(flat, spec)
  backbone.save_backbone(output_dir, {"params": params}, spec)
  return spec
