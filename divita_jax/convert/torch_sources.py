r"""PyTorch backbone sources: torchvision, Hugging Face Swin, Efficient-3DCNNs.

Each reads the checkpoint (tree.read_torch_state_dict: weights_only, no
pickled code runs), maps and checks it key by key (convert/swin.py,
convert/convnets.py), and writes it with the checkpoint's preprocessing in
spec.json. These backbones have no position embeddings: `resolution` /
`num_frames` only set the input size the spec records (e.g. 24 frames for
DIViTA's clips instead of the recipe's 16 or 32).

drop: regexes on the checkpoint's own keys (e.g. 'layer4\..*', HF
'swin\.encoder\.layers\.3\..*'), discarded before conversion (classifier
heads are always discarded). dont_load: regexes on the Flax variable paths
without the collection (e.g. 'layer4_1/bn2/.*' matches the BatchNorm's
scale, bias, mean and var), re-initialised as a random init of the model
would be; their source keys may be absent or dropped.
"""

import os

from divita_jax.convert import convnets, swin
from divita_jax.convert.tree import (
  ConversionError,
  drop_keys,
  fill_fresh,
  read_torch_state_dict,
)
from divita_jax.models import backbone

SWIN_ARCHS = ("swin_t", "swin_s", "swin_b", "swin3d_t", "swin3d_s", "swin3d_b")
TORCHVISION_ARCHS = (*SWIN_ARCHS, *convnets.TORCHVISION_ARCHS)
# Clip (3-D) models among them: the only ones `num_frames` applies to.
VIDEO_ARCHS = ("swin3d_t", "swin3d_s", "swin3d_b", "r2plus1d_18")


def read(source: str, path: str, arch, width, drop=(), dont_load=()):
  """-> (kind, variables, model fields, preprocessing, variant); the
  variables lack the leaves matching dont_load."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input {path} does not exist.")
  if source == "hf_swin":
    params, fields, pre = swin.from_hf_swin(path, drop, dont_load)
    kind = "swin3d" if len(fields["patch"]) == 3 else "swin"
    return kind, {"params": params}, fields, pre, "hf_swin"
  if source == "efficient3d":
    sd = drop_keys(read_torch_state_dict(path), drop, "drop")
    variables, fields, pre = convnets.from_efficient3d(sd, width, dont_load)
    return "shufflenet", variables, fields, pre, f"shufflenetv2_{width}x"
  if arch not in TORCHVISION_ARCHS:
    raise ConversionError(
      f"--source torchvision needs --arch, one of {list(TORCHVISION_ARCHS)}."
    )
  sd = drop_keys(read_torch_state_dict(path), drop, "drop")
  if arch in SWIN_ARCHS:
    params, fields, pre = swin.from_torchvision(sd, arch, dont_load=dont_load)
    kind = "swin3d" if arch.startswith("swin3d") else "swin"
    return kind, {"params": params}, fields, pre, arch
  variables, fields, pre = convnets.from_torchvision(sd, arch, dont_load)
  return convnets.TORCHVISION_ARCHS[arch][0], variables, fields, pre, arch


def convert(
  source: str,
  path: str,
  output: str,
  *,
  arch: str | None = None,
  width: float = 1.0,
  resolution: int | None = None,
  num_frames: int | None = None,
  drop=(),
  dont_load=(),
  normalization: str | None = None,
  seed: int = 0,
) -> dict:
  """Reads, checks and writes a PyTorch backbone; returns its spec.

  normalization: a backbone.NORMALIZATIONS name replacing the checkpoint's
  own mean / std as the input convention (its preprocessing keeps them).
  """
  kind, variables, fields, pre, variant = read(
    source, path, arch, width, drop, dont_load
  )
  spec = {"kind": kind, "model": fields}
  frames = 1 if backbone.is_image_model(spec) else pre["num_frames"]
  spec = backbone.make_spec(
    kind,
    fields,
    variant=variant,
    resolution=resolution or pre["resolution"],
    num_frames=1 if frames == 1 else num_frames or frames,
    normalization=normalization,
    mean=pre["mean"],
    std=pre["std"],
    preprocessing=pre,
    source={
      "type": source,
      "path": os.path.abspath(path),
      "drop": list(drop),
      "dont_load": list(dont_load),
    },
  )
  if dont_load:
    variables = fill_fresh(variables, spec, seed)
  backbone.save_backbone(output, variables, spec)
  return spec
