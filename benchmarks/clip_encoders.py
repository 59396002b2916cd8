r"""Clip encoders: our V-JEPA 2 and VideoPrism vs transformers, fp32 CPU.

  python benchmarks/clip_encoders.py            # real sizes (~12 min, 2 cores)
  python benchmarks/clip_encoders.py --models videoprism --iters 3
  python benchmarks/clip_encoders.py --smoke    # tiny sizes, seconds (CI)

Real sizes: V-JEPA 2 ViT-L/16 at 256 px on 16-frame clips (the fpc16
input; 8 x 16 x 16 = 2048 tokens) and VideoPrism-B at 288 px on 16
frames (16 x 256 spatial, 256 x 16 temporal tokens). The same random
weights go through our converter's key mapping (hf_vjepa2.map_keys,
hf_videoprism.map_keys) into our module. Ours: jax.jit of module.apply;
the reference: transformers' VJEPA2Model encoder (get_vision_features,
its default SDPA attention) / VideoPrismVisionModel (eager attention: SDPA
has no soft-cap), under torch.inference_mode; both fp32, run round-robin
in one process (timing.round_robin), best round each.

GMACs per clip of the model's own frame count, analytic: patch embedding,
q/k/v/out projections and MLP per token and block, and the two attention
matmuls (N^2 D per block). Our 24-frame clips are resampled to that frame
count (models/clip_time.py), so a 24-frame clip costs the same.
"""

import argparse
import os

import jax
import numpy as np
import timing
import torch
import transformers
from flax import traverse_util

from divita_jax.convert import hf_videoprism, hf_vjepa2
from divita_jax.models import videoprism, vjepa2
from divita_jax.references.torchvision_cpu import torchvision

REAL = dict(
  vjepa2_variant="L/16",
  vjepa2_resolution=256,
  vjepa2_frames=16,
  videoprism_variant="B/18",
  videoprism_resolution=288,
  videoprism_frames=16,
)
SMOKE = dict(
  vjepa2_variant="tiny/8",
  vjepa2_resolution=32,
  vjepa2_frames=4,
  videoprism_variant="tiny/8",
  videoprism_resolution=32,
  videoprism_frames=4,
  iters=1,
)


def block_macs(tokens, width, mlp, seq):
  """One pre-LN block on `tokens` tokens in sequences of `seq`."""
  dense = tokens * (4 * width * width + 2 * width * mlp)
  return dense + 2 * tokens * seq * width  # q k^T and weights @ v


def params_of(module, x):
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


def load_params(flat):
  return jax.tree.map(
    jax.numpy.asarray, traverse_util.unflatten_dict(flat, sep="/")
  )


def state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def vjepa2_row(args):
  f = vjepa2.decode_variant(args.vjepa2_variant)
  r, t = args.vjepa2_resolution, args.vjepa2_frames
  cfg = transformers.VJEPA2Config(
    hidden_size=f["width"],
    num_hidden_layers=f["depth"],
    num_attention_heads=f["num_heads"],
    mlp_ratio=f["mlp_dim"] / f["width"],
    patch_size=f["patch_size"],
    crop_size=r,
    frames_per_clip=t,
    pred_num_hidden_layers=1,  # the predictor is not timed
  )
  ref = transformers.VJEPA2Model(cfg).eval()
  sd = {k: v for k, v in state_dict(ref).items() if k.startswith("encoder.")}
  module = vjepa2.VJEPA2(**f)
  params = load_params(hf_vjepa2.map_keys(sd, f["num_heads"]))
  tokens = t // f["tubelet"] * (r // f["patch_size"]) ** 2
  patch = f["tubelet"] * f["patch_size"] ** 2 * 3
  macs = tokens * patch * f["width"] + f["depth"] * block_macs(
    tokens, f["width"], f["mlp_dim"], tokens
  )
  run_ref = lambda x: ref.get_vision_features(x)
  name = f"V-JEPA 2 {args.vjepa2_variant} {r}px {t}f"
  return name, module, params, run_ref, (t, r), macs


def videoprism_row(args):
  f = videoprism.decode_variant(args.videoprism_variant)
  r, t, p = args.videoprism_resolution, args.videoprism_frames, f["patch_size"]
  cfg = transformers.VideoPrismVisionConfig(
    hidden_size=f["width"],
    num_spatial_layers=f["depth"],
    num_temporal_layers=f["temporal_depth"],
    num_attention_heads=f["num_heads"],
    intermediate_size=f["mlp_dim"],
    image_size=r,
    num_frames=t,
    tubelet_size=[1, p, p],
  )
  ref = transformers.VideoPrismVisionModel(cfg).eval()
  module = videoprism.VideoPrism(**f, native_resolution=r, native_frames=t)
  flat = hf_videoprism.map_keys(state_dict(ref), f["num_heads"], f["depth"])
  params = load_params(flat)
  hw = (r // p) ** 2
  w, mlp = f["width"], f["mlp_dim"]
  macs = t * hw * p * p * 3 * w
  macs += f["depth"] * block_macs(t * hw, w, mlp, hw)
  macs += f["temporal_depth"] * block_macs(t * hw, w, mlp, t)
  run_ref = lambda x: ref(x).last_hidden_state
  name = f"VideoPrism {args.videoprism_variant} {r}px {t}f"
  return name, module, params, run_ref, (t, r), macs


def bench(row, args):
  name, module, params, run_ref, (t, r), macs = row
  x = np.random.RandomState(0).rand(args.batch, t, r, r, 3)
  x = x.astype(np.float32)
  tx = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy())  # NTCHW
  f = jax.jit(lambda p, v: module.apply({"params": p}, v)[0])
  xj = jax.numpy.asarray(x)

  def ref():
    with torch.inference_mode():
      run_ref(tx)

  fns = {"ours": lambda: f(params, xj).block_until_ready(), "torch": ref}
  times = timing.round_robin(fns, args.iters)
  rate = {k: args.batch / v.best for k, v in times.items()}
  n = params_of(module, xj)
  return (
    f"| {name} | {n / 1e6:.1f} M | {macs / 1e9:.1f} | {rate['ours']:.3f} "
    f"| {rate['torch']:.3f} | {rate['ours'] / rate['torch']:.2f}x |"
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vjepa2,videoprism")
  p.add_argument("--iters", type=int, default=2, help="Timed rounds.")
  p.add_argument("--batch", type=int, default=1)
  for k, v in REAL.items():
    p.add_argument(f"--{k}", type=type(v), default=v)
  p.add_argument("--smoke", action="store_true", help="Tiny run (CI).")
  args = p.parse_args()
  if args.smoke:
    vars(args).update(SMOKE)
  torchvision()  # before transformers imports torchvision
  torch.manual_seed(0)
  start = open("/proc/loadavg").read().strip()
  rows = []
  for model in args.models.split(","):
    row = {"vjepa2": vjepa2_row, "videoprism": videoprism_row}[model](args)
    rows.append(bench(row, args))
  end = open("/proc/loadavg").read().strip()
  print(
    f"fp32, batch {args.batch}, best of {args.iters} round-robin rounds, "
    f"{os.cpu_count()} CPUs; /proc/loadavg at start: {start}, at end: "
    f"{end}. GMACs per clip of the model's frame count (= per 24-frame "
    "clip resampled to it)."
  )
  print(
    "| model | params | GMACs/clip | ours clips/s | torch clips/s | ratio |"
  )
  print("|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
