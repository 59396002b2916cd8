"""PyTorch backbone sources: torchvision, Hugging Face Swin, Efficient-3DCNNs.

Each reads the checkpoint (tree.read_torch_state_dict: weights_only, no
pickled code runs), maps and checks it key by key (convert/swin.py,
convert/convnets.py), and writes it with the checkpoint's preprocessing in
spec.json. These backbones have no position embeddings: `resolution` /
`num_frames` only set the input size the spec records (e.g. 24 frames for
DIViTA's clips instead of the recipe's 16 or 32).
"""

import os

from divita_jax.convert import convnets, swin
from divita_jax.convert.tree import ConversionError, read_torch_state_dict
from divita_jax.models import backbone

SWIN_ARCHS = ("swin_t", "swin_s", "swin_b", "swin3d_t", "swin3d_s", "swin3d_b")
TORCHVISION_ARCHS = (*SWIN_ARCHS, *convnets.TORCHVISION_ARCHS)


def read(source: str, path: str, arch: str | None, width: float):
  """-> (kind, variables, model fields, preprocessing, variant)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--input {path} does not exist.")
  if source == "hf_swin":
    params, fields, pre = swin.from_hf_swin(path)
    kind = "swin3d" if len(fields["patch"]) == 3 else "swin"
    return kind, {"params": params}, fields, pre, "hf_swin"
  if source == "efficient3d":
    sd = read_torch_state_dict(path)
    variables, fields, pre = convnets.from_efficient3d(sd, width)
    return "shufflenet", variables, fields, pre, f"shufflenetv2_{width}x"
  if arch not in TORCHVISION_ARCHS:
    raise ConversionError(
      f"--source torchvision needs --arch, one of {list(TORCHVISION_ARCHS)}."
    )
  sd = read_torch_state_dict(path)
  if arch in SWIN_ARCHS:
    params, fields, pre = swin.from_torchvision(sd, arch)
    kind = "swin3d" if arch.startswith("swin3d") else "swin"
    return kind, {"params": params}, fields, pre, arch
  variables, fields, pre = convnets.from_torchvision(sd, arch)
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
) -> dict:
  """Reads, checks and writes a PyTorch backbone; returns its spec."""
  kind, variables, fields, pre, variant = read(source, path, arch, width)
  spec = {"kind": kind, "model": fields}
  frames = 1 if backbone.is_image_model(spec) else pre["num_frames"]
  spec = backbone.make_spec(
    kind,
    fields,
    variant=variant,
    resolution=resolution or pre["resolution"],
    num_frames=1 if frames == 1 else num_frames or frames,
    mean=pre["mean"],
    std=pre["std"],
    preprocessing=pre,
    source={"type": source, "path": os.path.abspath(path)},
  )
  backbone.save_backbone(output, variables, spec)
  return spec
