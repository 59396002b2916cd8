r"""Frame encoders past the paper: SigLIP, DINOv2, DINOv3 vs transformers.

  python benchmarks/frame_encoders.py            # B sizes at 224, fp32
  python benchmarks/frame_encoders.py --smoke    # tiny sizes, seconds (CI)

Each model is a random-init transformers reference (SiglipVisionModel
B/16, Dinov2Model B/14 with its 518-px 37 x 37 table resized to 224 at run
time as the hub checkpoints are used, DINOv3ViTModel B/16 with 4
registers), saved with `save_pretrained` and converted with our converter,
so both run the same weights. One Markdown table per model: parameters,
GMACs per 24-frame clip (torch's FlopCounterMode on the reference, one
frame x 24: frame encoders run per frame), clips/s of ours (jax.jit, fp32)
and of the reference (torch.inference_mode, fp32) timed round-robin in this
process (timing.round_robin, best round), and the ratio. The load average
and the others' CPU share (loadavg.Watch) are printed with each table.
"""

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import loadavg
import numpy as np
import timing
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from divita_jax.convert import hf_dinov2, hf_dinov3, hf_siglip
from divita_jax.models import backbone
from divita_jax.references.torchvision_cpu import torchvision

CLIP_FRAMES = 24
B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def references(smoke):
  """name -> (HF model, our converter, resolution)."""
  size = TINY if smoke else B
  mlp = 4 * size["hidden_size"]
  r = 32 if smoke else 224
  siglip = transformers.SiglipVisionModel(
    transformers.SiglipVisionConfig(
      **size, intermediate_size=mlp, image_size=r, patch_size=8 if smoke else 16
    )
  )
  dinov2 = transformers.Dinov2Model(
    transformers.Dinov2Config(
      **size, image_size=56 if smoke else 518, patch_size=8 if smoke else 14
    )
  )
  dinov3 = transformers.DINOv3ViTModel(
    transformers.DINOv3ViTConfig(
      **size,
      intermediate_size=mlp,
      image_size=r,
      patch_size=8 if smoke else 16,
      num_register_tokens=4,
    )
  )
  tag = "tiny" if smoke else "B"
  return {
    f"SigLIP {tag}/{8 if smoke else 16}": (siglip, hf_siglip, r),
    f"DINOv2 {tag}/{8 if smoke else 14}": (dinov2, hf_dinov2, r),
    f"DINOv3 {tag}/{8 if smoke else 16}": (dinov3, hf_dinov3, r),
  }


def ours(model, converter, resolution, tmp):
  """The reference's weights through our converter -> (module, vars)."""
  src, dst = os.path.join(tmp, "hf"), os.path.join(tmp, "ours")
  model.save_pretrained(src)
  converter.convert(src, dst, resolution=resolution)
  module, variables, _ = backbone.load_backbone(dst)
  return module, variables


def gmacs_per_clip(model, resolution):
  counter = FlopCounterMode(display=False)
  with torch.inference_mode(), counter:
    model(torch.zeros(1, 3, resolution, resolution))
  return CLIP_FRAMES * counter.get_total_flops() / 2e9


def bench(name, model, converter, resolution, args):
  model = model.eval()
  with tempfile.TemporaryDirectory() as tmp:
    module, variables = ours(model, converter, resolution, tmp)
  x = np.random.RandomState(0).randn(args.batch, resolution, resolution, 3)
  x = x.astype(np.float32)
  f = jax.jit(lambda v, a: module.apply(v, a)[0])
  jx = jnp.asarray(x)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  def run_torch():
    with torch.inference_mode():
      model(tx)

  fns = {
    "ours": lambda: f(variables, jx).block_until_ready(),
    "transformers": run_torch,
  }
  with loadavg.Watch() as load:
    times = timing.round_robin(fns, args.rounds)
  clips = {k: args.batch / t.best / CLIP_FRAMES for k, t in times.items()}
  params = sum(p.size for p in jax.tree.leaves(variables))
  ref_params = sum(p.numel() for p in model.parameters())
  gmacs = gmacs_per_clip(model, resolution)
  ratio = clips["ours"] / clips["transformers"]
  rows = [
    f"### {name} at {resolution} px, batch {args.batch} frames, fp32",
    "",
    "| model | impl | params (M) | GMACs / 24-frame clip | clips/s | ratio |",
    "|---|---|---|---|---|---|",
    f"| {name} | jax | {params / 1e6:.2f} | {gmacs:.3g} | "
    f"{clips['ours']:.3f} | {ratio:.2f}x |",
    f"| {name} | torch | {ref_params / 1e6:.2f} | {gmacs:.3g} | "
    f"{clips['transformers']:.3f} | 1.00x |",
    "",
    load.report(),
    "",
  ]
  print("\n".join(rows), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round")
  p.add_argument("--batch", type=int, default=8, help="frames per call")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument(
    "--models", default="SigLIP,DINOv2,DINOv3", help="comma-separated"
  )
  args = p.parse_args()
  if args.smoke:
    args.batch, args.rounds = 2, 1
  torchvision()  # transformers' vision imports need it declared first
  torch.manual_seed(0)
  with open("/proc/loadavg") as f:
    print(f"load average at start: {f.read().strip()}\n")
  wanted = args.models.split(",")
  for name, (model, converter, r) in references(args.smoke).items():
    if name.split()[0] in wanted:
      bench(name, model, converter, r, args)


if __name__ == "__main__":
  main()
