"""Hugging Face DINOv3 ViT folders (`DINOv3ViTModel`, model_type
dinov3_vit) -> `models.dinov3` backbones.

The mask token (pre-training only) is read and knowingly discarded. Biases
the module cannot leave out (query, value, output projection, MLP) must be
on; the key bias may be either (`key_bias`).
"""

from divita_jax.convert import hf_dinov2 as hf
from divita_jax.convert.hf_dinov2 import BLK, DST, out, qkv, qkv_bias, same, t
from divita_jax.convert.tree import ConversionError

_ACTS = ("gelu", "gelu_pytorch_tanh", "silu", "swish")


def fields_of(config) -> dict:
  """DINOv3 config.json -> model fields (ConversionError naming a field
  the module cannot represent)."""
  hf.need(config, "num_channels", (3, None))
  for field in ("query_bias", "value_bias", "proj_bias", "mlp_bias"):
    hf.need(config, field, (True, None), " (the module always has it)")
  act = hf.need(config, "hidden_act", _ACTS)
  patch = config.get("patch_size", 16)
  if not isinstance(patch, int):
    raise ConversionError(f"config.json patch_size={patch!r}: int expected.")
  return dict(
    width=config["hidden_size"],
    depth=config["num_hidden_layers"],
    mlp_dim=config["intermediate_size"],
    num_heads=config["num_attention_heads"],
    patch_size=patch,
    num_registers=config.get("num_register_tokens", 0),
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
    mlp_act=act,
    gated_mlp=bool(config.get("use_gated_mlp", False)),
    rope_theta=float(config.get("rope_theta", 100.0)),
    key_bias=bool(config.get("key_bias", False)),
  )


def rules(heads, gated):
  att = DST + "MultiHeadDotProductAttention_0/"
  mlp = DST + "MlpBlock_0/"
  names = {"q": "query", "k": "key", "v": "value"}
  plain = {"up": "Dense_0", "down": "Dense_1"}
  r = [
    (r"embeddings\.cls_token", "cls", same),
    (r"embeddings\.register_tokens", "Transformer/register_embed", same),
    (r"embeddings\.patch_embeddings\.weight", "embedding/kernel", hf.conv),
    (r"embeddings\.patch_embeddings\.bias", "embedding/bias", same),
    (BLK + r"norm1\.weight", DST + "LayerNorm_0/scale", same),
    (BLK + r"norm1\.bias", DST + "LayerNorm_0/bias", same),
    (BLK + r"norm2\.weight", DST + "LayerNorm_1/scale", same),
    (BLK + r"norm2\.bias", DST + "LayerNorm_1/bias", same),
    (BLK + r"attention\.o_proj\.weight", att + "out/kernel", out(heads)),
    (BLK + r"attention\.o_proj\.bias", att + "out/bias", same),
    (BLK + r"layer_scale1\.lambda1", DST + "LayerScale_0/scale", same),
    (BLK + r"layer_scale2\.lambda1", DST + "LayerScale_1/scale", same),
    (r"norm\.weight", "Transformer/encoder_norm/scale", same),
    (r"norm\.bias", "Transformer/encoder_norm/bias", same),
  ]
  for short, name in names.items():
    r += [
      (
        BLK + rf"attention\.{short}_proj\.weight",
        att + f"{name}/kernel",
        qkv(heads),
      ),
      (
        BLK + rf"attention\.{short}_proj\.bias",
        att + f"{name}/bias",
        qkv_bias(heads),
      ),
    ]
  for proj in ("gate", "up", "down"):
    dst = proj if gated else plain.get(proj, "no_gate_in_plain_mlp")
    r += [
      (BLK + rf"mlp\.{proj}_proj\.weight", mlp + f"{dst}/kernel", t),
      (BLK + rf"mlp\.{proj}_proj\.bias", mlp + f"{dst}/bias", same),
    ]
  return r


def convert(path: str, output: str, *, resolution: int | None = None) -> dict:
  """Reads, checks and writes a DINOv3 ViT folder; returns its spec."""
  config, flat = hf.read_config(path, ("dinov3_vit",))
  fields = fields_of(config)
  mapped, unknown = hf.map_keys(
    flat,
    rules(fields["num_heads"], fields["gated_mlp"]),
    drop=(r"embeddings\.mask_token",),
  )
  size = config.get("image_size", 224)
  pre = hf.preprocessing(
    path,
    size=size,
    resize=size,
    crop=None,
    interpolation="bilinear",
    mean=hf.IMAGENET[0],
    std=hf.IMAGENET[1],
  )
  res = resolution or pre["resolution"]
  params = hf.build("dinov3", fields, mapped, unknown, res)
  return hf.write(
    "dinov3", path, output, params, fields, pre, resolution, "hf_dinov3_vit"
  )
