r"""Converts public checkpoints into divita_jax backbones (or a DIViTA head).

  python -m divita_jax.convert --source SOURCE --input PATH --output DIR
    [--dont_load RE ...] [--drop RE ...] [--resolution R] [--num_frames T]
    [--normalization N] [--source_resolution R]
    [--inflate_tubelet 2 --kernel_init {central,average}]

ViT / ViViT sources (see divita_jax/convert/vit.py): vit_npz, hf_vit,
hf_vivit, scenic_vit, scenic_vivit.
PyTorch backbones (see divita_jax/convert/torch_sources.py):
  --source torchvision --arch {swin_t,swin_s,swin_b,swin3d_t,swin3d_s,
    swin3d_b,resnet18..resnet152,shufflenet_v2_x0_5..x2_0,r2plus1d_18}
  --source hf_swin (a Hugging Face SwinModel folder)
  --source efficient3d --width 1.0 (Efficient-3DCNNs 3-D ShuffleNet-V2)
DIViTA head: divita_torch (an official PyTorch state dict or Lightning
checkpoint; see divita_jax/convert/divita_torch.py).

Output: DIR/params (orbax) and DIR/spec.json (divita_jax.models.backbone);
for divita_torch, DIR/params and DIR/head.json.
"""

import argparse
import json

from divita_jax.convert import divita_torch, torch_sources, vit
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone

TORCH_SOURCES = ("torchvision", "hf_swin", "efficient3d")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--source",
    required=True,
    choices=[*vit.SOURCES, *TORCH_SOURCES, "divita_torch"],
  )
  p.add_argument(
    "--arch",
    choices=torch_sources.TORCHVISION_ARCHS,
    help="torchvision: the model builder's name.",
  )
  p.add_argument(
    "--width", type=float, default=1.0, help="efficient3d: width multiplier."
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
    "--num_frames",
    type=int,
    help="Clip frames (ViViT: posemb resampled; 3-D nets: recorded).",
  )
  p.add_argument(
    "--source_resolution",
    type=int,
    help="Scenic spatio-temporal ViViT: its input side (default 224).",
  )
  p.add_argument(
    "--normalization",
    choices=sorted(backbone.NORMALIZATIONS),
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
  p.add_argument(
    "--cam",
    help="divita_torch: the head's CAM string when the checkpoint has no "
    "hyper-parameters (e.g. tsfm-1-4-128-0.1).",
  )
  return p.parse_args(argv)


def convert(a) -> dict:
  if a.source == "divita_torch":
    return divita_torch.convert(a.input, a.output, cam=a.cam)
  if a.source in TORCH_SOURCES:
    return torch_sources.convert(
      a.source,
      a.input,
      a.output,
      arch=a.arch,
      width=a.width,
      resolution=a.resolution,
      num_frames=a.num_frames,
    )
  return vit.convert(
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


def main(argv=None):
  a = parse_args(argv)
  try:
    spec = convert(a)
  except (ConversionError, FileNotFoundError, FileExistsError) as e:
    raise SystemExit(f"convert: error: {e}") from None
  print(json.dumps(spec, indent=2))


if __name__ == "__main__":
  main()
