"""Hugging Face DINOv2 folders (`Dinov2Model`, `Dinov2WithRegistersModel`)
-> `models.dinov2` backbones.

Also the pieces the SigLIP and DINOv3 converters share: `map_keys` (regex
rules, strict: tree.check_keys against the module's own tree),
`preprocessing` (preprocessor_config.json, else the reference processor's
defaults) and `write` (spec + save_backbone). The mask token (pre-training
only) is the one file key read and knowingly discarded.
"""

import json
import os
import re

import numpy as np

from divita_jax.convert.hf import read_weights
from divita_jax.convert.tree import (
  ConversionError,
  build_params,
)
from divita_jax.models import backbone

_PIL = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
BLK = r"(?:encoder\.layers?|layers?)\.(\d+)\."
DST = r"Transformer/encoderblock_\1/"


def t(w):
  return w.T  # torch Linear [out, in] -> Dense [in, out]


def same(a):
  return a


def qkv(heads):
  return lambda w: w.T.reshape(w.shape[1], heads, -1)  # [D, H, hd]


def qkv_bias(heads):
  return lambda b: b.reshape(heads, -1)


def out(heads):
  return lambda w: w.T.reshape(heads, -1, w.shape[0])  # [H, hd, D]


def conv(w):
  return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def read_config(path: str, model_types) -> tuple[dict, dict]:
  """(config.json, flat weights) of a folder whose model_type is one of
  model_types; anything else is a ConversionError naming the field."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--input {path} is not a folder.")
  config, flat = read_weights(path)
  if config.get("model_type") not in model_types:
    raise ConversionError(
      f"{path}: wrong architecture: config.json model_type "
      f"{config.get('model_type')!r}, expected one of {list(model_types)}."
    )
  return config, flat


def need(config, field, allowed, why=""):
  """The config's `field` must be one of `allowed` (a ConversionError
  naming it otherwise)."""
  value = config.get(field)
  if value not in allowed:
    raise ConversionError(
      f"config.json {field}={value!r} is not supported (one of "
      f"{list(allowed)}){why}."
    )
  return value


def map_keys(flat, rules, *, drop=()):
  """flat HF dict -> ({param path: array}, unknown HF keys). drop:
  regexes of file keys read and discarded on purpose."""
  mapped, unknown = {}, []
  for key, value in flat.items():
    if any(re.fullmatch(p, key) for p in drop):
      continue
    for pattern, template, fn in rules:
      m = re.fullmatch(pattern, key)
      if m:
        try:
          mapped[m.expand(template)] = np.asarray(fn(value), np.float32)
        except ValueError as e:
          raise ConversionError(f"{key} {value.shape}: {e}") from e
        break
    else:
      unknown.append(key)
  return mapped, unknown


def build(kind, fields, mapped, unknown, resolution):
  """Strict check of mapped against the module's tree -> params."""
  spec = {"kind": kind, "model": fields, "resolution": resolution}
  spec["num_frames"] = 1
  return build_params(mapped, spec, unused=unknown)


def preprocessing(folder, *, size, resize, crop, interpolation, mean, std):
  """The checkpoint's resize / crop / mean / std: preprocessor_config.json
  when the folder has one, else the given reference defaults."""
  pre = dict(
    resolution=crop or size,
    num_frames=1,
    resize=resize,
    crop=crop,
    interpolation=interpolation,
    mean=list(mean),
    std=list(std),
  )
  path = os.path.join(folder, "preprocessor_config.json")
  if not os.path.exists(path):
    return pre
  with open(path) as f:
    p = json.load(f)
  s = p.get("size", resize)
  if isinstance(s, dict):
    s = s.get("shortest_edge") or s.get("height")
  crop = p.get("crop_size") if p.get("do_center_crop") else None
  crop = crop.get("height") if isinstance(crop, dict) else crop
  pre.update(resize=int(s), crop=crop and int(crop))
  pre["resolution"] = int(crop or s)
  pre["interpolation"] = _PIL.get(p.get("resample", 3), "bicubic")
  pre["mean"] = [float(v) for v in p.get("image_mean", mean)]
  pre["std"] = [float(v) for v in p.get("image_std", std)]
  return pre


def write(kind, path, output, params, fields, pre, resolution, variant):
  """spec (the checkpoint's preprocessing) + save_backbone -> spec."""
  res = resolution or pre["resolution"]
  if res % fields["patch_size"]:
    raise ConversionError(
      f"resolution {res} is not a multiple of patch {fields['patch_size']}."
    )
  spec = backbone.make_spec(
    kind,
    fields,
    variant=variant,
    resolution=res,
    num_frames=1,
    mean=pre["mean"],
    std=pre["std"],
    preprocessing=pre,
    source={"type": f"hf_{kind}", "path": os.path.abspath(path)},
  )
  backbone.save_backbone(output, {"params": params}, spec)
  return spec


def fields_of(config) -> dict:
  """DINOv2 config.json -> model fields (what the module represents)."""
  need(config, "num_channels", (3, None))
  need(config, "qkv_bias", (True, None))
  act = need(config, "hidden_act", ("gelu", "gelu_pytorch_tanh", "silu"))
  patch = config.get("patch_size", 14)
  if not isinstance(patch, int):
    raise ConversionError(f"config.json patch_size={patch!r}: int expected.")
  width = config["hidden_size"]
  mlp_dim = int(width * config.get("mlp_ratio", 4))
  gated = bool(config.get("use_swiglu_ffn", False))
  if gated:  # DINOv2's SwiGLU width rule
    mlp_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
  registers = config["model_type"] == "dinov2_with_registers"
  return dict(
    width=width,
    depth=config["num_hidden_layers"],
    mlp_dim=mlp_dim,
    num_heads=config["num_attention_heads"],
    patch_size=patch,
    posemb_grid=config.get("image_size", 224) // patch,
    num_registers=config.get("num_register_tokens", 0) if registers else 0,
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
    mlp_act="silu" if gated else act,
    gated_mlp=gated,
    posemb_interpolation="bicubic_antialias" if registers else "bicubic",
  )


def rules(heads):
  att = DST + "MultiHeadDotProductAttention_0/"
  mlp = DST + "MlpBlock_0/"
  r = [
    (r"embeddings\.cls_token", "cls", same),
    (r"embeddings\.register_tokens", "Transformer/register_embed", same),
    (
      r"embeddings\.position_embeddings",
      "Transformer/posembed_input/pos_embedding",
      same,
    ),
    (
      r"embeddings\.patch_embeddings\.projection\.weight",
      "embedding/kernel",
      conv,
    ),
    (r"embeddings\.patch_embeddings\.projection\.bias", "embedding/bias", same),
    (BLK + r"norm1\.weight", DST + "LayerNorm_0/scale", same),
    (BLK + r"norm1\.bias", DST + "LayerNorm_0/bias", same),
    (BLK + r"norm2\.weight", DST + "LayerNorm_1/scale", same),
    (BLK + r"norm2\.bias", DST + "LayerNorm_1/bias", same),
    (
      BLK + r"attention\.attention\.(query|key|value)\.weight",
      att + r"\2/kernel",
      qkv(heads),
    ),
    (
      BLK + r"attention\.attention\.(query|key|value)\.bias",
      att + r"\2/bias",
      qkv_bias(heads),
    ),
    (BLK + r"attention\.output\.dense\.weight", att + "out/kernel", out(heads)),
    (BLK + r"attention\.output\.dense\.bias", att + "out/bias", same),
    (BLK + r"layer_scale1\.lambda1", DST + "LayerScale_0/scale", same),
    (BLK + r"layer_scale2\.lambda1", DST + "LayerScale_1/scale", same),
    (BLK + r"mlp\.fc1\.weight", mlp + "Dense_0/kernel", t),
    (BLK + r"mlp\.fc1\.bias", mlp + "Dense_0/bias", same),
    (BLK + r"mlp\.fc2\.weight", mlp + "Dense_1/kernel", t),
    (BLK + r"mlp\.fc2\.bias", mlp + "Dense_1/bias", same),
    (BLK + r"mlp\.weights_out\.weight", mlp + "down/kernel", t),
    (BLK + r"mlp\.weights_out\.bias", mlp + "down/bias", same),
    (r"layernorm\.weight", "Transformer/encoder_norm/scale", same),
    (r"layernorm\.bias", "Transformer/encoder_norm/bias", same),
  ]
  return r  # weights_in (fused gate + up): split_swiglu, GATED_RULES


def split_swiglu(flat):
  """mlp.weights_in [2M, D] (gate rows first) -> gate_proj / up_proj."""
  out = {}
  for key, w in flat.items():
    m = re.fullmatch(r"(.*mlp\.)weights_in\.(weight|bias)", key)
    if not m:
      out[key] = w
      continue
    gate, up = np.split(w, 2, axis=0)
    out[f"{m.group(1)}gate_proj.{m.group(2)}"] = gate
    out[f"{m.group(1)}up_proj.{m.group(2)}"] = up
  return out


GATED_RULES = [
  (BLK + r"mlp\.(gate|up)_proj\.weight", DST + r"MlpBlock_0/\2/kernel", t),
  (BLK + r"mlp\.(gate|up)_proj\.bias", DST + r"MlpBlock_0/\2/bias", same),
]


def convert(path: str, output: str, *, resolution: int | None = None) -> dict:
  """Reads, checks and writes a DINOv2 folder; returns its spec."""
  config, flat = read_config(path, ("dinov2", "dinov2_with_registers"))
  fields = fields_of(config)
  flat = {k.removeprefix("dinov2."): v for k, v in flat.items()}
  flat = split_swiglu(flat)
  mapped, unknown = map_keys(
    flat,
    rules(fields["num_heads"]) + GATED_RULES,
    drop=(r"embeddings\.mask_token",),
  )
  pre = preprocessing(
    path,
    size=224,
    resize=256,
    crop=224,
    interpolation="bicubic",
    mean=IMAGENET[0],
    std=IMAGENET[1],
  )
  res = resolution or pre["resolution"]
  params = build("dinov2", fields, mapped, unknown, res)
  return write(
    "dinov2",
    path,
    output,
    params,
    fields,
    pre,
    resolution,
    config["model_type"],
  )
