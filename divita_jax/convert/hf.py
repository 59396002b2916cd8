"""Hugging Face ViT / ViViT folders -> flat Scenic tree and model fields."""

import json
import os
import re

from divita_jax.convert.tree import ConversionError, Flat, to_f32

_HF_ACT = {
  "gelu": False,
  "gelu_fast": True,
  "gelu_new": True,
  "gelu_pytorch_tanh": True,
}


def read_weights(path: str) -> tuple[dict, Flat]:
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise ConversionError(f"{cfg_path} not found (HF folder expected).")
  with open(cfg_path) as f:
    config = json.load(f)
  files = [path] if os.path.isfile(path) else []
  index = os.path.join(folder, "model.safetensors.index.json")
  if not files and os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(folder, s) for s in shards]
  for name in ("model.safetensors", "pytorch_model.bin"):
    if not files and os.path.exists(os.path.join(folder, name)):
      files = [os.path.join(folder, name)]
  if not files:
    raise ConversionError(
      f"No model.safetensors / pytorch_model.bin in {folder}."
    )
  flat = {}
  for file in files:
    try:
      if file.endswith(".safetensors"):
        from safetensors.numpy import load_file

        flat.update(load_file(file))
      else:
        import torch

        sd = torch.load(file, map_location="cpu", weights_only=True)
        flat.update({k: v.float().numpy() for k, v in sd.items()})
    except Exception as e:
      raise ConversionError(f"{file}: unreadable weights ({e}).") from e
  return config, {k: to_f32(v) for k, v in flat.items()}


def _hf_rules(heads: int, conv_perm: tuple[int, ...]):
  """(regex on HF key, Scenic path template, transform) for ViT/ViViT."""
  blk = r"(?:encoder\.layer|layers)\.(\d+)\."
  dst = r"Transformer/encoderblock_\1/"
  att = dst + "MultiHeadDotProductAttention_0/"
  t = lambda w: w.T
  qkv_w = lambda w: w.T.reshape(w.shape[1], heads, -1)  # [D, H, hd]
  qkv_b = lambda b: b.reshape(heads, -1)
  out_w = lambda w: w.T.reshape(heads, -1, w.shape[0])  # [H, hd, D]
  same = lambda a: a
  return [
    (r"embeddings\.cls_token", "cls", same),
    (
      r"embeddings\.position_embeddings",
      "Transformer/posembed_input/pos_embedding",
      same,
    ),
    (
      r"embeddings\.patch_embeddings\.projection\.weight",
      "embedding/kernel",
      lambda w: w.transpose(conv_perm),
    ),
    (r"embeddings\.patch_embeddings\.projection\.bias", "embedding/bias", same),
    (blk + r"layernorm_before\.weight", dst + "LayerNorm_0/scale", same),
    (blk + r"layernorm_before\.bias", dst + "LayerNorm_0/bias", same),
    (blk + r"layernorm_after\.weight", dst + "LayerNorm_1/scale", same),
    (blk + r"layernorm_after\.bias", dst + "LayerNorm_1/bias", same),
    (
      blk + r"attention\.attention\.(query|key|value)\.weight",
      att + r"\2/kernel",
      qkv_w,
    ),
    (
      blk + r"attention\.attention\.(query|key|value)\.bias",
      att + r"\2/bias",
      qkv_b,
    ),
    (blk + r"attention\.output\.dense\.weight", att + "out/kernel", out_w),
    (blk + r"attention\.output\.dense\.bias", att + "out/bias", same),
    (
      blk + r"intermediate\.dense\.weight",
      dst + "MlpBlock_0/Dense_0/kernel",
      t,
    ),
    (blk + r"intermediate\.dense\.bias", dst + "MlpBlock_0/Dense_0/bias", same),
    (blk + r"output\.dense\.weight", dst + "MlpBlock_0/Dense_1/kernel", t),
    (blk + r"output\.dense\.bias", dst + "MlpBlock_0/Dense_1/bias", same),
    (r"layernorm\.weight", "Transformer/encoder_norm/scale", same),
    (r"layernorm\.bias", "Transformer/encoder_norm/bias", same),
    (r"pooler\.dense\.weight", "pre_logits/kernel", t),
    (r"pooler\.dense\.bias", "pre_logits/bias", same),
    (r"classifier\.weight", "output_projection/kernel", t),
    (r"classifier\.bias", "output_projection/bias", same),
  ]


def map_hf(hf: Flat, heads: int, kind: str) -> Flat:
  """HF ViT / ViViT state dict -> flat Scenic tree.

  Keys no rule knows keep their HF name, so the strict check
  (tree.check_keys) lists them as unexpected and --drop can name them.
  """
  perm = (2, 3, 1, 0) if kind == "vit" else (2, 3, 4, 1, 0)
  rules = _hf_rules(heads, perm)
  prefix = f"{kind}."
  out = {}
  for key, value in hf.items():
    k = key[len(prefix) :] if key.startswith(prefix) else key
    for pattern, template, fn in rules:
      m = re.fullmatch(pattern, k)
      if m:
        out[m.expand(template)] = fn(value)
        break
    else:
      out[key] = value
  return out


def read_hf(path: str, kind: str) -> tuple[Flat, dict]:
  """HF folder -> (flat Scenic tree, model fields from config.json)."""
  config, hf = read_weights(path)
  if config.get("model_type") != kind:
    raise ConversionError(
      f"{path}: wrong architecture: config.json model_type "
      f"{config.get('model_type')!r}, expected {kind!r}."
    )
  act = config.get("hidden_act", "gelu")
  if act not in _HF_ACT:
    raise ConversionError(f"Unsupported hidden_act {act!r}; {list(_HF_ACT)}.")
  if not config.get("qkv_bias", True) or config.get("num_channels", 3) != 3:
    raise ConversionError("Only qkv_bias=True, num_channels=3 are supported.")
  fields = dict(
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
    gelu_approximate=_HF_ACT[act],
  )
  if kind == "vivit":  # The posemb alone cannot tell frames from pixels.
    fields["_resolution"] = config["image_size"]
    fields["_num_frames"] = config["num_frames"]
  flat = map_hf(hf, config["num_attention_heads"], kind)
  return flat, fields
