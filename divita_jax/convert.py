r"""Converts public ViT / ViViT checkpoints into divita_jax backbones.

  python -m divita_jax.convert --source {vit_npz,hf_vit,hf_vivit,
    scenic_vit,scenic_vivit} --input PATH --output DIR [--dont_load RE ...]
    [--drop RE ...] [--resolution R] [--num_frames T] [--normalization N]
    [--source_resolution R]
    [--inflate_tubelet 2 --kernel_init {central,average}]

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
parameter must be written: unknown keys, missing keys and shape mismatches
are errors listing the keys. Patterns (regexes on '/'-joined Scenic paths,
e.g. 'output_projection/.*'): --dont_load re-initialises the matching
parameters; --drop removes matching source keys before the architecture is
read (e.g. drop the head or pre_logits). The numerics of the source are kept
(HF ViT: exact GELU and its LayerNorm epsilon), so outputs match it.

--inflate_tubelet turns a ViT source into a spatio-temporal ViViT (Scenic's
2-D -> 3-D initialisation: inflated patch kernel, posemb tiled in time).

Output: DIR/params (orbax) and DIR/spec.json (see divita_jax.models).
"""

import argparse
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from divita_jax import models
from divita_jax.models import surgery

Flat = dict[str, np.ndarray]
_HF_ACT = {
  "gelu": False,
  "gelu_fast": True,
  "gelu_new": True,
  "gelu_pytorch_tanh": True,
}


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message says why."""


def _to_f32(a) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype.kind == "V" and a.dtype.itemsize == 2:
    import ml_dtypes  # Raw 2-byte big_vision arrays are bfloat16.

    a = a.view(ml_dtypes.bfloat16)
  return a.astype(np.float32)


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def renumber_pre_linen(flat: Flat) -> Flat:
  """Pre-linen names (one counter per parent) -> per-type counters.

  As flax's convert_pre_linen: siblings `<Type>_<n>` are renumbered per
  type in natural order (encoderblock_10 stays after encoderblock_9).
  """
  children: dict[str, set[str]] = {}
  for key in flat:
    parts = key.split("/")
    for i in range(len(parts) - 1):
      children.setdefault("/".join(parts[:i]), set()).add(parts[i])
  rename: dict[tuple[str, str], str] = {}
  for parent, names in children.items():
    by_type: dict[str, list[str]] = {}
    for n in names:
      m = re.fullmatch(r"(.*)_(\d+)", n)
      if m:
        by_type.setdefault(m.group(1), []).append(n)
    for typ, ns in by_type.items():
      for i, n in enumerate(sorted(ns, key=_natural_key)):
        rename[(parent, n)] = f"{typ}_{i}"
  out = {}
  for key, value in flat.items():
    parts = key.split("/")
    new = [rename.get(("/".join(parts[:i]), p), p) for i, p in enumerate(parts)]
    out["/".join(new)] = value
  return out


def _strip_prefix(flat: Flat, prefixes: Sequence[str]) -> Flat:
  for p in prefixes:
    if flat and all(k.startswith(p) for k in flat):
      return {k[len(p) :]: v for k, v in flat.items()}
  return flat


def _unscan(flat: Flat) -> Flat:
  """big_vision scan layout: Transformer/encoderblock/* [depth, ...]."""
  out = {}
  for k, v in flat.items():
    m = re.fullmatch(r"(\w*Transformer)/encoderblock/(.*)", k)
    if not m:
      out[k] = v
      continue
    for i in range(v.shape[0]):
      out[f"{m.group(1)}/encoderblock_{i}/{m.group(2)}"] = v[i]
  return out


def _load_npz(path: str) -> Flat:
  try:
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
      return {k: _to_f32(f[k]) for k in f.files}
  except (OSError, ValueError, EOFError, KeyError) as e:
    raise ConversionError(f"{path}: not a readable .npz file ({e}).") from e
  except Exception as e:  # zipfile.BadZipFile and friends on truncation.
    raise ConversionError(f"{path}: corrupt or truncated .npz ({e}).") from e


def read_vit_npz(path: str) -> Flat:
  """vit_jax / big_vision npz -> flat Scenic ViT tree."""
  flat = _strip_prefix(
    _load_npz(path), ("opt/target/", "params/img/", "params/")
  )
  flat = renumber_pre_linen(_unscan(flat))
  if "head/kernel" in flat or "head/bias" in flat:
    flat = {
      re.sub(r"^head/", "output_projection/", k): v for k, v in flat.items()
    }
  pe_key = "Transformer/posembed_input/pos_embedding"
  for old in ("pos_embedding", "Transformer/pos_embedding"):
    if old in flat:  # big_vision: no class slot, cls gets no posemb.
      pe = flat.pop(old)
      if "cls" in flat:
        pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
      flat[pe_key] = pe
  return flat


def _hf_weights(path: str) -> tuple[dict, Flat]:
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
  return config, {k: _to_f32(v) for k, v in flat.items()}


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
  """HF ViT / ViViT state dict -> flat Scenic tree; unknown keys raise."""
  perm = (2, 3, 1, 0) if kind == "vit" else (2, 3, 4, 1, 0)
  rules = _hf_rules(heads, perm)
  prefix = f"{kind}."
  out, unknown = {}, []
  for key, value in hf.items():
    k = key[len(prefix) :] if key.startswith(prefix) else key
    for pattern, template, fn in rules:
      m = re.fullmatch(pattern, k)
      if m:
        out[m.expand(template)] = fn(value)
        break
    else:
      unknown.append(key)
  if unknown:
    raise ConversionError(f"Unknown HF {kind} keys: {sorted(unknown)}")
  return out


def read_hf(path: str, kind: str) -> tuple[Flat, dict]:
  """HF folder -> (flat Scenic tree, model fields from config.json)."""
  config, hf = _hf_weights(path)
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


def read_scenic(path: str) -> Flat:
  """Scenic flax msgpack checkpoint file -> flat Scenic tree."""
  from flax import serialization, traverse_util

  if os.path.isdir(path):
    path = os.path.join(path, "checkpoint")
  try:
    with open(path, "rb") as f:
      state = serialization.msgpack_restore(f.read())
  except Exception as e:
    raise ConversionError(
      f"{path}: not a readable flax msgpack checkpoint "
      f"({type(e).__name__}: {e})."
    ) from e
  tree = state
  for keys in (("optimizer", "target"), ("params",)):
    sub = state
    for k in keys:
      sub = sub.get(k) if isinstance(sub, dict) else None
    if sub is not None:
      tree = sub
      break
  if isinstance(tree, dict) and "params" in tree and "embedding" not in tree:
    tree = tree["params"]  # Nested optimizer/target/params (pre-linen era).
  if not isinstance(tree, dict):
    raise ConversionError(f"{path}: no parameter tree found.")
  flat = traverse_util.flatten_dict(tree, sep="/")
  return renumber_pre_linen({k: _to_f32(v) for k, v in flat.items()})


def _need(flat: Flat, key: str, what: str) -> np.ndarray:
  if key not in flat:
    raise ConversionError(
      f"Missing key {key!r}: not a {what} checkpoint? Keys: "
      f"{sorted(flat)[:12]}{' ...' if len(flat) > 12 else ''}"
    )
  return flat[key]


def infer_model(
  flat: Flat,
  kind: str,
  resolution: int | None = None,
  num_frames: int | None = None,
) -> tuple[dict, int, int]:
  """Model fields, resolution and frames read from the tree's shapes."""
  kernel = _need(flat, "embedding/kernel", kind)
  want = 4 if kind == "vit" else 5
  if kernel.ndim != want:
    raise ConversionError(
      f"Wrong architecture: embedding/kernel {kernel.shape} is "
      f"{kernel.ndim}-D, a {kind} has a {want}-D patch kernel."
    )
  factorized = any(k.startswith("SpatialTransformer/") for k in flat)
  enc = "SpatialTransformer" if factorized else "Transformer"
  blocks = {
    m.group(1)
    for k in flat
    if (m := re.match(enc + r"/encoderblock_(\d+)/", k))
  }
  q = _need(
    flat,
    f"{enc}/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
    kind,
  )
  mlp = _need(flat, f"{enc}/encoderblock_0/MlpBlock_0/Dense_0/kernel", kind)
  cls = "cls_SpatialTransformer" if factorized else "cls"
  model = dict(
    width=q.shape[0],
    depth=len(blocks),
    mlp_dim=mlp.shape[1],
    num_heads=q.shape[1],
    patch_size=kernel.shape[-3],
    classifier="token" if cls in flat else "gap",
  )
  if kernel.shape[-3] != kernel.shape[-4]:
    raise ConversionError(f"Non-square patches {kernel.shape} unsupported.")
  if "pre_logits/kernel" in flat:
    model["representation_size"] = flat["pre_logits/kernel"].shape[1]
  if "output_projection/kernel" in flat:
    model["num_classes"] = flat["output_projection/kernel"].shape[1]
  prefix = int(model["classifier"] == "token")
  pe = _need(flat, f"{enc}/posembed_input/pos_embedding", kind)
  n = pe.shape[1] - prefix
  if kind == "vivit":
    model["tubelet"] = kernel.shape[0]
    model["model_type"] = (
      "factorized_encoder" if factorized else "spatio_temporal"
    )
  if factorized:
    tblocks = {
      m.group(1)
      for k in flat
      if (m := re.match(r"TemporalTransformer/encoderblock_(\d+)/", k))
    }
    model["temporal_depth"] = len(tblocks)
    tpe = _need(flat, "TemporalTransformer/posembed_input/pos_embedding", kind)
    num_frames = (tpe.shape[1] - prefix) * kernel.shape[0]
  elif kind == "vivit":  # T'*g*g tokens: one of the two sizes is needed.
    if resolution is None and num_frames is None:
      resolution = 224  # Every published ViViT runs at 224 px.
    if resolution is not None:
      num_frames = n // (resolution // kernel.shape[1]) ** 2 * kernel.shape[0]
    n = n // (num_frames // kernel.shape[0])
  grid = int(round(np.sqrt(n)))
  if grid * grid != n:
    raise ConversionError(
      f"posemb {pe.shape}: {n} tokens are not a square "
      "grid (give --resolution / --num_frames)."
    )
  frames = 1 if kind == "vit" else num_frames
  return model, grid * kernel.shape[1], frames


def _match(patterns: Sequence[str], key: str) -> bool:
  return any(re.fullmatch(p, key) for p in patterns)


def build_params(
  flat: Flat, spec: dict, dont_load: Sequence[str] = (), seed: int = 0
):
  """Checks flat against the model's tree key by key -> params tree."""
  from flax import traverse_util

  module = models.module_from_spec(spec)
  target = traverse_util.flatten_dict(
    models.abstract_params(module, spec), sep="/"
  )
  loaded = {k: v for k, v in flat.items() if not _match(dont_load, k)}
  missing = [k for k in target if k not in loaded and not _match(dont_load, k)]
  unexpected = [k for k in loaded if k not in target]
  shapes = [
    f"{k}: {loaded[k].shape} vs model {target[k].shape}"
    for k in loaded
    if k in target and loaded[k].shape != target[k].shape
  ]
  errors = []
  if missing:
    errors.append(f"missing keys {sorted(missing, key=_natural_key)}")
  if unexpected:
    errors.append(f"unexpected keys {sorted(unexpected, key=_natural_key)}")
  if shapes:
    errors.append(f"shape mismatches {shapes}")
  if errors:
    raise ConversionError(
      "Checkpoint does not fit the model: " + "; ".join(errors)
    )
  fresh = {}
  if len(loaded) < len(target):
    fresh = traverse_util.flatten_dict(
      models.init_params(module, spec, seed), sep="/"
    )
  out = {k: loaded[k] if k in loaded else np.asarray(fresh[k]) for k in target}
  return traverse_util.unflatten_dict(out, sep="/")


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
    kind, flat = "vit", read_vit_npz(path)
  elif source in ("hf_vit", "hf_vivit"):
    kind = source[3:]
    flat, fields = read_hf(path, kind)
    resolution = fields.pop("_resolution", None)
    num_frames = fields.pop("_num_frames", None)
  elif source in ("scenic_vit", "scenic_vivit"):
    kind, flat = source[7:], read_scenic(path)
  else:
    raise ValueError(f"Unknown --source {source!r}.")
  flat = {k: v for k, v in flat.items() if not _match(drop, k)}
  model, res, frames = infer_model(flat, kind, resolution, num_frames)
  model.update(fields)
  spec = models.make_spec(
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
  new = models.make_spec(
    "vivit",
    model,
    variant=None,
    normalization=spec["normalization"],
    resolution=spec["resolution"],
    num_frames=num_frames,
    source=dict(spec["source"], inflated=kernel_init),
  )
  target = models.init_params(models.module_from_spec(new), new)
  vit_params = {
    k: v
    for k, v in params.items()
    if k not in ("output_projection", "pre_logits")
  }
  out = surgery.vit_to_vivit(
    vit_params,
    target,
    vit_grid=models.token_grid(spec),
    vivit_grid=models.token_grid(new),
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
  params, new = models.resize_params(params, spec, res, frames)
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
  params = build_params(flat, spec, dont_load)
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
  models.save_backbone(output, params, spec)
  return spec


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--source",
    required=True,
    choices=["vit_npz", "hf_vit", "hf_vivit", "scenic_vit", "scenic_vivit"],
  )
  p.add_argument("--input", required=True, help="File or HF folder.")
  p.add_argument("--output", required=True, help="Output directory.")
  p.add_argument(
    "--dont_load",
    action="append",
    default=[],
    help="Regex of params to re-initialise.",
  )
  p.add_argument(
    "--drop",
    action="append",
    default=[],
    help="Regex of source keys to discard (e.g. the head).",
  )
  p.add_argument(
    "--resolution", type=int, help="Input side (posemb resampled)."
  )
  p.add_argument(
    "--num_frames", type=int, help="ViViT frames (posemb resampled)."
  )
  p.add_argument(
    "--source_resolution",
    type=int,
    help="Scenic spatio-temporal ViViT: its input side (default 224).",
  )
  p.add_argument(
    "--normalization",
    choices=sorted(models.NORMALIZATIONS),
    help="Input convention (default minus_one_one).",
  )
  p.add_argument(
    "--inflate_tubelet",
    type=int,
    help="ViT sources: write a spatio-temporal ViViT with this tubelet.",
  )
  p.add_argument(
    "--kernel_init",
    default="central",
    choices=["central", "average"],
    help="Frame initialiser of --inflate_tubelet.",
  )
  a = p.parse_args(argv)
  try:
    spec = convert(
      a.source,
      a.input,
      a.output,
      dont_load=a.dont_load,
      drop=a.drop,
      resolution=a.resolution,
      num_frames=a.num_frames,
      normalization=a.normalization,
      inflate_tubelet=a.inflate_tubelet,
      kernel_init=a.kernel_init,
      source_resolution=a.source_resolution,
    )
  except (ConversionError, FileNotFoundError, FileExistsError) as e:
    raise SystemExit(f"convert: error: {e}") from None
  print(json.dumps(spec, indent=2))


if __name__ == "__main__":
  main()
