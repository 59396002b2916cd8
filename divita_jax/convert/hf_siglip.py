"""Hugging Face SigLIP folders -> `models.siglip` backbones.

Accepted: a `SiglipVisionModel` folder (model_type siglip_vision_model) or
a whole `SiglipModel` (model_type siglip: the vision tower's
`vision_model.*` keys and `vision_config`; the text tower and the logit
scale / bias are read and knowingly discarded). SigLIP 2's fixed-resolution
checkpoints (google/siglip2-*-patch16-224 ...) are SiglipModel folders and
convert here. SigLIP 2 NaFlex folders (siglip2 / siglip2_vision_model) do
not: their Linear patch embedding runs on processor-flattened patches with
per-image aspect-preserving grids, their table is resized bilinearly with
antialias per image and padded tokens are masked; a ConversionError says
so instead of loading a model that computes something else.
"""

from divita_jax.convert import hf_dinov2 as hf
from divita_jax.convert.hf_dinov2 import BLK, DST, out, qkv, qkv_bias, same, t
from divita_jax.convert.tree import ConversionError

TYPES = ("siglip_vision_model", "siglip", "siglip2", "siglip2_vision_model")
# HF hidden_act -> gelu_approximate (tanh form) of vit.MlpBlock.
_ACT = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True}
_ACT["gelu"] = False  # exact erf GELU


def fields_of(config) -> dict:
  """Vision config -> SigLIP model fields (ConversionError naming the
  field the module cannot represent)."""
  if config.get("vision_use_head", True) is not True:
    raise ConversionError(
      "config.json vision_use_head=False: no attention-pooling head, so "
      "no pooler_output to use as the feature."
    )
  hf.need(config, "num_channels", (3, None))
  act = hf.need(config, "hidden_act", tuple(_ACT))
  patch, size = config.get("patch_size", 16), config.get("image_size", 224)
  if not isinstance(patch, int) or not isinstance(size, int):
    raise ConversionError(
      f"config.json patch_size={patch!r} / image_size={size!r}: square "
      "ints expected."
    )
  return dict(
    width=config["hidden_size"],
    depth=config["num_hidden_layers"],
    mlp_dim=config["intermediate_size"],
    num_heads=config["num_attention_heads"],
    patch_size=patch,
    posemb_grid=size // patch,
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
    gelu_approximate=_ACT[act],
  )


def split_in_proj(flat):
  """head.attention.in_proj_{weight,bias} ([q; k; v] rows) -> q/k/v."""
  out_ = {}
  for key, w in flat.items():
    if key.startswith("head.attention.in_proj_"):
      kind = key.rsplit("_", 1)[1]
      for name, part in zip("qkv", _thirds(w)):
        out_[f"head.attention.{name}_proj.{kind}"] = part
    else:
      out_[key] = w
  return out_


def _thirds(w):
  n = w.shape[0] // 3
  return [w[:n], w[n : 2 * n], w[2 * n :]]


def rules(heads):
  att = DST + "MultiHeadDotProductAttention_0/"
  mlp = DST + "MlpBlock_0/"
  hd = "MAPHead_0/"
  names = {"q": "query", "k": "key", "v": "value"}
  r = [
    (r"embeddings\.patch_embedding\.weight", "embedding/kernel", hf.conv),
    (r"embeddings\.patch_embedding\.bias", "embedding/bias", same),
    (
      r"embeddings\.position_embedding\.weight",
      "Transformer/posembed_input/pos_embedding",
      lambda w: w[None],
    ),
    (BLK + r"layer_norm(1|2)\.weight", DST + "LN\\2/scale", same),
    (BLK + r"layer_norm(1|2)\.bias", DST + "LN\\2/bias", same),
    (BLK + r"self_attn\.out_proj\.weight", att + "out/kernel", out(heads)),
    (BLK + r"self_attn\.out_proj\.bias", att + "out/bias", same),
    (BLK + r"mlp\.fc(1|2)\.weight", mlp + "fc\\2/kernel", t),
    (BLK + r"mlp\.fc(1|2)\.bias", mlp + "fc\\2/bias", same),
    (r"post_layernorm\.weight", "Transformer/encoder_norm/scale", same),
    (r"post_layernorm\.bias", "Transformer/encoder_norm/bias", same),
    (r"head\.probe", hd + "probe", same),
    (
      r"head\.attention\.out_proj\.weight",
      hd + "MultiHeadDotProductAttention_0/out/kernel",
      out(heads),
    ),
    (
      r"head\.attention\.out_proj\.bias",
      hd + "MultiHeadDotProductAttention_0/out/bias",
      same,
    ),
    (r"head\.layernorm\.weight", hd + "LayerNorm_0/scale", same),
    (r"head\.layernorm\.bias", hd + "LayerNorm_0/bias", same),
    (r"head\.mlp\.fc(1|2)\.weight", hd + "MlpBlock_0/fc\\1/kernel", t),
    (r"head\.mlp\.fc(1|2)\.bias", hd + "MlpBlock_0/fc\\1/bias", same),
  ]
  for short, name in names.items():
    r += [
      (
        BLK + rf"self_attn\.{short}_proj\.weight",
        att + f"{name}/kernel",
        qkv(heads),
      ),
      (
        BLK + rf"self_attn\.{short}_proj\.bias",
        att + f"{name}/bias",
        qkv_bias(heads),
      ),
      (
        rf"head\.attention\.{short}_proj\.weight",
        hd + f"MultiHeadDotProductAttention_0/{name}/kernel",
        qkv(heads),
      ),
      (
        rf"head\.attention\.{short}_proj\.bias",
        hd + f"MultiHeadDotProductAttention_0/{name}/bias",
        qkv_bias(heads),
      ),
    ]
  return r


def rename(mapped):
  """Placeholders of the rules -> the module's names (LN1 -> LayerNorm_0,
  fc1 -> Dense_0, ...)."""
  subs = {"LN1": "LayerNorm_0", "LN2": "LayerNorm_1", "fc1": "Dense_0"}
  subs["fc2"] = "Dense_1"
  out_ = {}
  for key, v in mapped.items():
    parts = [subs.get(p, p) for p in key.split("/")]
    out_["/".join(parts)] = v
  return out_


def convert(path: str, output: str, *, resolution: int | None = None) -> dict:
  """Reads, checks and writes a SigLIP vision tower; returns its spec."""
  config, flat = hf.read_config(path, TYPES)
  kind = config["model_type"]
  if kind.startswith("siglip2"):
    raise ConversionError(
      f"{path}: config.json model_type {kind!r} is SigLIP 2 NaFlex (Linear "
      "patch embedding on processor-flattened patches, per-image grids, "
      "antialiased bilinear table resize, masked padding), which the "
      "fixed-grid siglip module does not represent; the fixed-resolution "
      "SigLIP 2 checkpoints (model_type 'siglip') convert."
    )
  drop = ()
  if kind == "siglip":  # whole model: the vision tower only
    config = config["vision_config"]
    drop = (r"text_model\..*", r"logit_(scale|bias)")
    flat = {k.removeprefix("vision_model."): v for k, v in flat.items()}
  fields = fields_of(config)
  mapped, unknown = hf.map_keys(
    split_in_proj(flat), rules(fields["num_heads"]), drop=drop
  )
  pre = hf.preprocessing(
    path,
    size=config.get("image_size", 224),
    resize=config.get("image_size", 224),
    crop=None,
    interpolation="bicubic",
    mean=[0.5] * 3,
    std=[0.5] * 3,
  )
  res = resolution or pre["resolution"]
  params = hf.build("siglip", fields, rename(mapped), unknown, res)
  return hf.write(
    "siglip", path, output, params, fields, pre, resolution, "hf_" + kind
  )
