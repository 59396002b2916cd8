"""ViT / ViViT conversion: read a source, check it, resample, write.

Sources:
- vit_npz: vit_jax / AugReg `.npz` (pre-linen block names, posemb with a
  class slot) and big_vision `.npz` (`params/` or `opt/target/` prefix,
  top-level `pos_embedding` without class slot, optional scan layout,
  bfloat16 arrays).
- hf_vit / hf_vivit: a Hugging Face folder (config.json + model.safetensors,
  sharded safetensors, or pytorch_model.bin read with weights_only=True).
- scenic_vit / scenic_vivit: a Scenic flax msgpack `checkpoint` file
  (params under `optimizer/target` or `params`).

Every source key must land on exactly one model parameter and every model
parameter must be written: unexpected keys, missing keys and shape
mismatches are errors listing the keys (tree.check_keys). Patterns (regexes
on '/'-joined Scenic paths, e.g. 'output_projection/.*'; HF keys no rule
maps keep their HF name): dont_load re-initialises the matching
parameters; drop removes matching source keys before the architecture is
read (e.g. drop the head or pre_logits). Patterns matching nothing are an
error. The numerics of the source are kept
(HF ViT: exact GELU and its LayerNorm epsilon), so outputs match it.

inflate_tubelet turns a ViT source into a spatio-temporal ViViT (Scenic's
2-D -> 3-D initialisation: inflated patch kernel, posemb tiled in time).
"""

import os

from divita_jax.convert import hf, scenic, tree, vit_npz
from divita_jax.convert.tree import ConversionError, Flat, drop_keys
from divita_jax.models import backbone, surgery

SOURCES = ("vit_npz", "hf_vit", "hf_vivit", "scenic_vit", "scenic_vivit")


def read_source(
  source: str,
  path: str,
  *,
  drop=(),
  source_resolution=None,
  normalization=None,
) -> tuple[Flat, dict]:
  """Any source -> (flat Scenic tree, spec at the source's own size).

  source_resolution: Scenic spatio-temporal ViViT only, whose posemb holds
  T' x h x w tokens without saying which is which (default 224 px, the
  size of every published ViViT).
  """
  resolution, num_frames = source_resolution, None
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input {path} does not exist.")
  fields, norm = {}, "minus_one_one"
  if source == "vit_npz":
    kind, flat = "vit", vit_npz.read_vit_npz(path)
  elif source in ("hf_vit", "hf_vivit"):
    kind = source[3:]
    flat, fields = hf.read_hf(path, kind)
    resolution = fields.pop("_resolution", None)
    num_frames = fields.pop("_num_frames", None)
  elif source in ("scenic_vit", "scenic_vivit"):
    kind, flat = source[7:], scenic.read_scenic(path)
  else:
    raise ValueError(f"Unknown --source {source!r}.")
  flat = drop_keys(flat, drop, "drop")
  model, res, frames = scenic.infer_model(flat, kind, resolution, num_frames)
  model.update(fields)
  spec = backbone.make_spec(
    kind,
    model,
    variant=None,
    normalization=normalization or norm,
    resolution=res,
    num_frames=frames,
    source={"type": source, "path": os.path.abspath(path)},
  )
  return flat, spec


def inflate(params, spec, *, tubelet, num_frames, kernel_init="central"):
  """ViT params/spec -> spatio-temporal ViViT (Scenic 2-D -> 3-D init).

  Patch kernel inflated ('central' or 'average' frame), posemb grid tiled
  over num_frames // tubelet steps, blocks copied, head dropped.
  """
  if spec["kind"] != "vit":
    raise ConversionError(f"Inflation needs a ViT, got {spec['kind']!r}.")
  if num_frames % tubelet:
    raise ConversionError(f"num_frames {num_frames} % tubelet {tubelet} != 0.")
  drop = ("num_classes", "representation_size")
  model = {k: v for k, v in spec["model"].items() if k not in drop}
  model.update(tubelet=tubelet, model_type="spatio_temporal")
  new = backbone.make_spec(
    "vivit",
    model,
    variant=None,
    normalization=spec["normalization"],
    resolution=spec["resolution"],
    num_frames=num_frames,
    source=dict(spec["source"], inflated=kernel_init),
  )
  target = backbone.init_params(backbone.module_from_spec(new), new)
  vit_params = {
    k: v
    for k, v in params.items()
    if k not in ("output_projection", "pre_logits")
  }
  out = surgery.vit_to_vivit(
    vit_params,
    target,
    vit_grid=backbone.token_grid(spec),
    vivit_grid=backbone.token_grid(new),
    kernel_init=kernel_init,
  )
  return out, new


def resize(params, spec, resolution, num_frames):
  """Resamples the posembs to the requested input size (None: keep)."""
  res = resolution or spec["resolution"]
  frames = 1 if spec["kind"] == "vit" else num_frames or spec["num_frames"]
  m = spec["model"]
  if res % m["patch_size"] or frames % m.get("tubelet", 1):
    raise ConversionError(
      f"Input {frames} x {res} px does not fit patch {m['patch_size']} / "
      f"tubelet {m.get('tubelet', 1)}."
    )
  if (res, frames) == (spec["resolution"], spec["num_frames"]):
    return params, spec
  params, new = backbone.resize_params(params, spec, res, frames)
  new["source"]["resampled_from"] = [spec["num_frames"], spec["resolution"]]
  return params, new


def convert(
  source: str,
  path: str,
  output: str,
  *,
  dont_load=(),
  drop=(),
  resolution=None,
  num_frames=None,
  normalization=None,
  inflate_tubelet=None,
  kernel_init="central",
  source_resolution=None,
) -> dict:
  """Reads, checks and writes a backbone checkpoint; returns its spec.

  resolution / num_frames: input size of the written model; position
  embeddings are resampled from the source's size (surgery.resample_posemb).

  inflate_tubelet: write a spatio-temporal ViViT initialised from the ViT
  source instead (num_frames frames, default 2 * tubelet).
  """
  flat, spec = read_source(
    source,
    path,
    drop=drop,
    source_resolution=source_resolution,
    normalization=normalization,
  )
  params = tree.build_params(flat, spec, dont_load)
  if inflate_tubelet:
    params, spec = inflate(
      params,
      spec,
      tubelet=inflate_tubelet,
      num_frames=num_frames or 2 * inflate_tubelet,
      kernel_init=kernel_init,
    )
  params, spec = resize(params, spec, resolution, num_frames)
  spec["source"]["dont_load"] = list(dont_load)
  spec["source"]["drop"] = list(drop)
  backbone.save_backbone(output, params, spec)
  return spec
